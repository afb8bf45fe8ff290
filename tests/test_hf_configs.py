"""The DeepSeek-V3 family of HF configs: the published config.json of DeepSeek-V3, V2, V2-Lite and two
DeepseekV3ForCausalLM releases of another lab (Moonshot's Kimi K2, model_type kimi_k2, and Moonlight)
load, build on the meta device with the exact parameter counts of the released checkpoints, and pass
the launch checks; config-carried coefficients are used; V3.2's sparse attention is refused.

tests/data/hf_configs/*.json are the published files (tests/data/hf_configs/SOURCES.md says where
each was read). The published counts below are element counts of the released safetensors files (from
their headers), which hold more than our model: the MTP module's copies of the embedding and head
(ours shares them), FP8 block scales (weight_scale_inv, one fp32 per 128x128 block of every FP8
linear), and, in Kimi K2, a rotary inv_freq buffer per layer.
"""
from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch

from megatron_dsv3.config import DSv3Config, DSv3ConfigError, cpu_overrides
from megatron_dsv3.config.hf_config import TRANSFORMERS_DEFAULTS, hf_to_config_kwargs, read_hf_config

DATA = os.path.join(os.path.dirname(__file__), "data", "hf_configs")

#: release -> (config file, published elements of the checkpoint or None, published total (rounded), fp8)
RELEASES = {
    "deepseek-v3": ("deepseek-v3.json", 684_531_386_000, "671B + MTP", True),
    "deepseek-v2": ("deepseek-v2.json", None, "236B", False),
    "deepseek-v2-lite": ("deepseek-v2-lite.json", 15_706_484_224, "15.7B", False),
    "kimi-k2": ("kimi-k2-instruct.json", 1_026_470_731_056, "1T", True),
    "moonlight": ("moonlight-16b-a3b-instruct.json", None, "16B", False),
}

#: The FP8 linears of the released checkpoints (our names): everything but router, eh_proj, embedding, head.
FP8_LINEARS = ("linear_q_down_proj", "linear_q_up_proj", "linear_q_proj", "linear_kv_down_proj",
               "linear_kv_up_proj", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
               "linear_fc1", "linear_fc2")


def _config(name, **kw):
    path = os.path.join(DATA, RELEASES[name][0])
    coefficients = dict(bias_update_rate=0.001, mtp_lambda=0.3)
    return DSv3Config.from_hf_config(path, **coefficients, **cpu_overrides(), perform_initialization=False, **kw)


def _meta_model(cfg):
    from megatron_dsv3.spec import build_model

    with torch.device("meta"):
        return build_model(cfg)


def _file_elements(model, cfg, hf: dict) -> int:
    """What the release's safetensors hold, from our model: every parameter and the expert-bias
    buffers, plus the MTP copies of embedding and head, FP8 block scales, Kimi's inv_freq buffers."""
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for k, b in model.named_buffers() if k.endswith("expert_bias"))
    n += (cfg.mtp_num_layers or 0) * 2 * cfg.vocab_size * cfg.hidden_size
    if "quantization_config" in hf:
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 2 and any(f"{k}.weight" in name for k in FP8_LINEARS) \
                    and "router" not in name and "eh_proj" not in name:
                rows, cols = p.shape
                halves = 2 if name.endswith("linear_fc1.weight") else 1     # gate;up stored apart in HF
                n += halves * math.ceil(rows / halves / 128) * math.ceil(cols / 128)
    if hf.get("model_type") == "kimi_k2":
        n += cfg.num_layers * 56   # its header lists self_attn.rotary_emb.inv_freq [56] (bf16) in every layer
    return n


@pytest.mark.parametrize("name", list(RELEASES))
def test_published_config_builds_with_the_checkpoint_parameter_count(name, cpu_world):
    file, published, rounded, fp8 = RELEASES[name]
    hf = read_hf_config(os.path.join(DATA, file))
    cfg = _config(name)
    model = _meta_model(cfg)
    assert next(model.parameters()).device.type == "meta"
    ours = sum(p.numel() for p in model.parameters())
    if published is not None:
        assert _file_elements(model, cfg, hf) == published, name
    # the model card's rounded total (main model; MTP not counted there)
    mtp = 0
    if cfg.mtp_num_layers:
        mtp = sum(p.numel() for n_, p in model.named_parameters() if n_.startswith("mtp."))
    main = ours - mtp + sum(b.numel() for k, b in model.named_buffers()
                            if k.endswith("expert_bias") and not k.startswith("mtp."))
    expected = {"deepseek-v3": 671_026_419_200, "deepseek-v2": 235_741_434_880, "deepseek-v2-lite": 15_706_484_224,
                "kimi-k2": 1_026_408_232_448, "moonlight": 15_960_110_208}[name]
    assert main == expected, (name, main)
    if rounded.endswith("B") and rounded[:-1].replace(".", "").isdigit():
        digits = len(rounded[:-1].split(".")[1]) if "." in rounded else 0
        assert round(main / 1e9, digits) == float(rounded[:-1]), (name, main)


def test_deepseek_v3_release_has_yarn_and_its_alpha(cpu_world):
    cfg = _config("deepseek-v3")
    assert cfg.rope_scaling["factor"] == 40 and cfg.mtp_num_layers == 1
    assert cfg.seq_aux_alpha == 0.001          # config.json's aux_loss_alpha (seq_aux: true)


def test_other_labs_accepted_by_architecture():
    kimi = hf_to_config_kwargs(read_hf_config(os.path.join(DATA, "kimi-k2-instruct.json")))
    assert kimi["n_routed_experts"] == 384 and kimi["n_group"] == 1 and kimi["mtp_num_layers"] is None
    with pytest.raises(DSv3ConfigError, match="not a DeepSeek-V3-family"):
        hf_to_config_kwargs({"architectures": ["LlamaForCausalLM"], "model_type": "kimi_k2"})


def test_v32_sparse_attention_is_refused():
    with pytest.raises(DSv3ConfigError, match="sparse attention.*index_n_heads"):
        hf_to_config_kwargs(read_hf_config(os.path.join(DATA, "deepseek-v3.2-exp.json")))


def test_missing_keys_take_transformers_defaults_or_are_named():
    hf = read_hf_config(os.path.join(DATA, "deepseek-v3.json"))
    for key in ("n_group", "topk_group", "norm_topk_prob"):
        del hf[key]
    used = {}
    kw = hf_to_config_kwargs(hf, used)
    assert (kw["n_group"], kw["topk_group"], kw["norm_topk_prob"]) == (8, 4, True)
    assert set(used) == {"n_group", "topk_group", "norm_topk_prob", "rope_interleave"}   # (not in the file)
    v2 = read_hf_config(os.path.join(DATA, "deepseek-v2.json"))
    del v2["num_experts_per_tok"]          # transformers' DeepseekV2Config default is None
    with pytest.raises(DSv3ConfigError, match="'num_experts_per_tok'"):
        hf_to_config_kwargs(v2)


def test_our_defaults_table_is_transformers():
    """TRANSFORMERS_DEFAULTS holds the values of the installed transformers' config classes."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    for family, cls in (("v3", DeepseekV3Config), ("v2", DeepseekV2Config)):
        params = inspect.signature(cls.__init__).parameters
        for key, value in TRANSFORMERS_DEFAULTS[family].items():
            name = {"num_nextn_predict_layers": "num_mtp_layers"}.get(key, key)
            assert name in params, (family, key)
            assert params[name].default == value, (family, key, params[name].default, value)


def test_seq_aux_false_is_refused_and_explicit_alpha_wins():
    hf = read_hf_config(os.path.join(DATA, "deepseek-v2-lite.json"))
    assert hf_to_config_kwargs(hf)["seq_aux_alpha"] == 0.001
    hf["seq_aux"] = False
    with pytest.raises(DSv3ConfigError, match="batch-wise"):
        hf_to_config_kwargs(hf)
    cfg = DSv3Config.from_hf_config(os.path.join(DATA, "deepseek-v2-lite.json"), seq_aux_alpha=1e-4,
                                    **cpu_overrides())
    assert cfg.seq_aux_alpha == 1e-4


def test_coefficient_error_lists_everything_missing_at_once():
    hf = read_hf_config(os.path.join(DATA, "deepseek-v3.json"))
    del hf["aux_loss_alpha"]
    with pytest.raises(DSv3ConfigError) as info:
        DSv3Config.from_hf_config(hf)
    msg = str(info.value)
    for name in ("seq_aux_alpha", "bias_update_rate", "mtp_lambda"):
        assert name in msg
    assert "DSv3Config.from_hf_config(path, seq_aux_alpha=..., bias_update_rate=..., mtp_lambda=...)" in msg


def test_moe_layer_freq_is_honoured(cpu_world):
    """moe_layer_freq 2: after the dense layers, every second layer is MoE (HF semantics); the spec, the
    HF key table and Megatron's moe_layer_freq agree."""
    from megatron_dsv3.checkpoint.hf_keys import expected_hf_keys
    from megatron_dsv3.config.presets import PRESETS

    cfg = DSv3Config.from_preset("tiny", num_layers=6, first_k_dense_replace=1, moe_layer_interval=2,
                                 **cpu_overrides())
    assert cfg.moe_layer_numbers == [2, 4] and cfg.moe_layer_freq == [0, 0, 1, 0, 1, 0]
    model = _meta_model(cfg)
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["MLP", "MLP", "DSv3MoELayer", "MLP", "DSv3MoELayer", "MLP"]
    keys = expected_hf_keys(cfg)
    assert "model.layers.3.mlp.gate_proj.weight" in keys and "model.layers.4.mlp.gate.weight" in keys
    hf = cfg.hf_dict()
    assert hf["moe_layer_freq"] == 2
    assert hf_to_config_kwargs(json.loads(json.dumps(hf)))["moe_layer_interval"] == 2
    assert PRESETS["tiny"].get("moe_layer_interval", 1) == 1


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "kimi-k2", "moonlight"])
def test_published_configs_pass_the_launch_checks(name, monkeypatch):
    from megatron.core import parallel_state

    from launch import TINY
    from megatron_dsv3.training import launcher

    def refuse(*a, **k):
        raise AssertionError("a process group was built during the launch checks")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", refuse)
    base = list(TINY)
    for flag in ("--dsv3-preset", "--num-layers"):
        i = base.index(flag)
        del base[i:i + 2]
    args = launcher.prepare(base + ["--dsv3-hf-config", os.path.join(DATA, RELEASES[name][0]), "--train-iters", "2",
                                    "--moe-router-bias-update-rate", "0.001", "--mtp-loss-scaling-factor", "0.3"])
    assert args.dsv3_fields["seq_aux_alpha"] == 0.001          # from config.json
    assert args.num_layers == read_hf_config(os.path.join(DATA, RELEASES[name][0]))["num_hidden_layers"]
