"""DSv3Config: presets, HF config.json mapping, validation with errors naming the field."""
from __future__ import annotations

import math

import pytest

from megatron_dsv3.config import PRESETS, DSv3Config, DSv3ConfigError, cpu_overrides
from megatron_dsv3.config.presets import DSV3_CONTEXT_EXTENSION_YARN
from megatron_dsv3.model.mla import mla_softmax_scale
from hf_reference import hf_config_dict


def test_deepseek_v3_preset_is_the_671b_model_as_pretrained():
    """The 671B shapes, plain RoPE at 4K (report sec. 4.2); YaRN comes with the extension phases."""
    c = DSv3Config.from_preset("deepseek-v3")
    assert (c.q_lora_rank, c.kv_lora_rank) == (1536, 512)                 # not Megatron's 512
    assert c.rope_scaling is None and c.rope_type == "rope" and c.max_position_embeddings == 4096
    assert mla_softmax_scale(c) == 192 ** -0.5
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_router_num_groups, c.moe_router_group_topk) == (256, 8, 8, 4)
    assert c.moe_router_topk_scaling_factor == 2.5 and c.layernorm_epsilon == 1e-6
    assert c.moe_layer_freq == [0, 0, 0] + [1] * 58
    assert c.moe_shared_expert_intermediate_size == 2048 and c.moe_ffn_hidden_size == 2048
    assert c.mtp_num_layers == 1 and c.mtp_loss_scaling_factor == 0.3
    assert c.moe_aux_loss_coeff == 0.0001 and c.moe_router_bias_update_rate == 0.001
    ext = DSv3Config.from_preset("deepseek-v3", rope_scaling=DSV3_CONTEXT_EXTENSION_YARN,
                                 max_position_embeddings=163840)
    assert (ext.rope_type, ext.rotary_scaling_factor, ext.mscale_all_dim) == ("yarn", 40.0, 1.0)  # not Megatron's 0.0
    m = 0.1 * 1.0 * math.log(40) + 1
    assert mla_softmax_scale(ext) == pytest.approx(192 ** -0.5 * m * m) == pytest.approx(0.1352338, abs=1e-7)


def test_v2_lite_and_tiny_presets():
    lite = DSv3Config.from_preset("deepseek-v2-lite")
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax" and not lite.moe_router_enable_expert_bias
    assert lite.moe_shared_expert_intermediate_size == 2 * 1408
    tiny = DSv3Config.from_preset("tiny", **cpu_overrides())
    assert tiny.transformer_impl == "local" and tiny.use_cpu_initialization
    assert set(PRESETS) == {"deepseek-v3", "deepseek-v2-lite", "tiny"}


def test_from_hf_config_needs_training_coefficients():
    hf = hf_config_dict(q_lora_rank=24)
    with pytest.raises(DSv3ConfigError, match="seq_aux_alpha"):
        DSv3Config.from_hf_config(hf, bias_update_rate=0.001, mtp_lambda=0.3)
    with pytest.raises(DSv3ConfigError, match="bias_update_rate"):
        DSv3Config.from_hf_config(hf, seq_aux_alpha=1e-4, mtp_lambda=0.3)
    with pytest.raises(DSv3ConfigError, match="mtp_lambda"):
        DSv3Config.from_hf_config(hf, seq_aux_alpha=1e-4, bias_update_rate=0.001)
    c = DSv3Config.from_hf_config(hf, seq_aux_alpha=0.0, bias_update_rate=0.001, mtp_lambda=0.3)
    assert c.moe_aux_loss_coeff == 0.0 and c.q_lora_rank == 24 and c.rope_scaling["factor"] == 4.0


def test_from_hf_config_reads_transformers5_rope_parameters():
    hf = hf_config_dict(q_lora_rank=None)
    rope = dict(hf.pop("rope_scaling"), rope_type="yarn", rope_theta=hf.pop("rope_theta"))
    rope.pop("type")
    hf["rope_parameters"] = rope
    c = DSv3Config.from_hf_config(hf, seq_aux_alpha=1e-4, bias_update_rate=1e-3, mtp_lambda=0.3)
    assert c.rope_theta == 10000.0 and c.rope_scaling["factor"] == 4.0 and c.q_lora_rank is None


@pytest.mark.parametrize("change, field", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),             # > 2 kept groups x 2 experts
    (dict(n_group=3), "n_group"),                                     # does not divide 8 experts
    (dict(topk_group=5), "topk_group"),
    (dict(tensor_model_parallel_size=3), "tensor_model_parallel_size"),   # 4 heads
    (dict(expert_model_parallel_size=3), "expert_model_parallel_size"),   # 8 experts
    (dict(tensor_model_parallel_size=2), "sequence_parallel"),        # MoE + TP needs SP
    (dict(seq_aux_alpha=None), "seq_aux_alpha"),
    (dict(q_lora_rank=DSv3Config.__dataclass_fields__["q_lora_rank"].default), "q_lora_rank"),
    (dict(first_k_dense_replace=7), "first_k_dense_replace"),
    (dict(num_moe_experts=16), "num_moe_experts"),                    # conflicting Megatron field
])
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(DSv3ConfigError, match=field):
        DSv3Config.from_preset("tiny", **{**cpu_overrides(), **change})


def test_unknown_preset():
    with pytest.raises(DSv3ConfigError, match="unknown preset 'deepseek-v4'"):
        DSv3Config.from_preset("deepseek-v4")


def test_derived_megatron_fields_list_is_complete():
    """Every Megatron field the DSv3 fields determine is in DERIVED_MEGATRON_FIELDS (the launcher
    leaves those to the derivation instead of taking Megatron's flag defaults): a plain
    MLATransformerConfig with the same shared fields differs from the DSv3 one only there."""
    import dataclasses

    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_dsv3.config import DERIVED_MEGATRON_FIELDS

    megatron_fields = {f.name for f in dataclasses.fields(MLATransformerConfig)}
    assert DERIVED_MEGATRON_FIELDS <= megatron_fields
    # Megatron fields DSv3Config declares again with DSv3's default (dropout 0): not derived, the
    # launcher passes Megatron's argument value for them.
    megatron_defaults = {f.name: f.default for f in dataclasses.fields(MLATransformerConfig)}
    redeclared = {f.name for f in dataclasses.fields(DSv3Config)
                  if f.name in megatron_defaults and f.default is not megatron_defaults[f.name]
                  and f.default != megatron_defaults[f.name]}
    assert redeclared == {"hidden_dropout", "attention_dropout", "q_lora_rank", "kv_lora_rank", "v_head_dim"}
    shared = ("num_layers", "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
              "v_head_dim", "mtp_num_layers")
    for name in ("deepseek-v3", "tiny"):
        cfg = DSv3Config.from_preset(name)
        plain = MLATransformerConfig(**{k: getattr(cfg, k) for k in shared})
        differ = {f for f in megatron_fields if not callable(getattr(cfg, f))   # init methods: objects
                  and getattr(cfg, f) != getattr(plain, f)}
        assert differ <= DERIVED_MEGATRON_FIELDS | redeclared, (name, differ - DERIVED_MEGATRON_FIELDS)
