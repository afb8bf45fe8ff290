"""THE mapping between DeepSeek-V3's fields, Megatron-LM's flags and Megatron-Core's config fields.

One row per Megatron quantity the DSv3 model determines. A row says:

- ``flag``:  the Megatron-LM argument (``args.<flag>``, i.e. ``--<flag with dashes>``), or None;
- ``core``:  the Megatron-Core ``TransformerConfig`` field :class:`DSv3Config` derives, or None when
  the DSv3 field IS the Megatron-Core field (``num_layers``, ``q_lora_rank`` ...) or there is none;
- ``field``: the DSv3 field a flag given on the command line sets (YaRN keys as ``rope_scaling.<key>``),
  or None for values the architecture fixes or derives;
- ``value``: how the flag's / core field's value follows from the DSv3 fields (default: the field);
- ``when``:  rows that only apply to models with MoE layers, MTP modules, sigmoid routing or YaRN;
- ``fixed``: the DeepSeek-V3 architecture fixes the value; a flag given with another value is an error.

Three readers use it and nothing else: :class:`~megatron_dsv3.config.DSv3Config` (derives ``core``
fields), the launcher's argument resolution (``flag`` -> ``field`` when a flag is given; DSv3 fields ->
every ``flag`` afterwards, so Megatron's own readers see the same model) and its launch checks
(``fixed`` rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch.nn.functional as F

_KEEP = object()


def _get(fields: Mapping, name: str):
    if name.startswith("rope_scaling."):
        rope = fields.get("rope_scaling")
        return None if rope is None else rope.get(name.split(".", 1)[1])
    return fields.get(name)


def moe_layer_pattern(fields: Mapping) -> list[int]:
    """1 for each decoder layer that is MoE: layer i >= first_k_dense_replace with
    i % moe_layer_interval == 0 (HF's moe_layer_freq), else 0 (dense)."""
    k, n, every = fields["first_k_dense_replace"], fields["num_layers"], fields.get("moe_layer_interval") or 1
    return [1 if i >= k and i % every == 0 else 0 for i in range(n)]


def has_moe(fields: Mapping) -> bool:
    """Does a model with these DSv3 fields have MoE layers (decoder or MTP)?"""
    return any(moe_layer_pattern(fields)) or bool(fields.get("mtp_num_layers"))


def _megatron_dispatcher(f: Mapping) -> str:
    from ..registry import megatron_dispatcher

    return megatron_dispatcher(f["token_dispatcher"])


_CONDITIONS: dict[str, Callable[[Mapping], bool]] = {
    "always": lambda f: True,
    "registered_dispatcher": lambda f: f.get("token_dispatcher") is not None,
    "moe": has_moe,
    "mtp": lambda f: bool(f.get("mtp_num_layers")),
    "yarn": lambda f: f.get("rope_scaling") is not None,
}


@dataclass(frozen=True)
class Row:
    flag: Optional[str]
    core: Optional[str]
    field: Optional[str] = None
    value: Optional[Callable[[Mapping], Any]] = None
    when: str = "always"
    fixed: bool = False
    why: str = ""
    #: the flag's value when the row does not apply (_KEEP: leave Megatron's)
    off: Any = _KEEP
    #: Megatron-LM's format of the flag's value
    as_flag: Callable[[Any], Any] = lambda v: v
    #: when the row does not apply, the Megatron-Core field keeps the value Megatron's own flag gave
    #: (so it is not in DERIVED_MEGATRON_FIELDS)
    passthrough: bool = False

    def applies(self, fields: Mapping) -> bool:
        return _CONDITIONS[self.when](fields)

    def of(self, fields: Mapping):
        """The row's value for these DSv3 fields."""
        return self.value(fields) if self.value is not None else _get(fields, self.field)


def _fixed(flag, core, value, why, when="always", as_flag=lambda v: v):
    return Row(flag, core, value=lambda f: value, when=when, fixed=True, why=why, as_flag=as_flag)


ROWS: tuple[Row, ...] = (
    # --- shape: the DSv3 field is also the Megatron-Core field --------------------------------
    Row("num_layers", None, "num_layers"),
    Row("hidden_size", None, "hidden_size"),
    Row("num_attention_heads", None, "num_attention_heads"),
    Row("max_position_embeddings", None, "max_position_embeddings"),
    Row("q_lora_rank", None, "q_lora_rank"),
    Row("kv_lora_rank", None, "kv_lora_rank"),
    Row("v_head_dim", None, "v_head_dim"),
    Row("mtp_num_layers", None, "mtp_num_layers"),
    # an all-MoE model has no dense FFN; Megatron still wants a width
    Row("ffn_hidden_size", "ffn_hidden_size", "ffn_hidden_size",
        value=lambda f: f["ffn_hidden_size"] if f.get("ffn_hidden_size") is not None
        else f["moe_intermediate_size"]),
    # --- MLA and RoPE ---------------------------------------------------------------------------
    Row("qk_head_dim", "qk_head_dim", "qk_nope_head_dim"),
    Row("qk_pos_emb_head_dim", "qk_pos_emb_head_dim", "qk_rope_head_dim"),
    Row("kv_channels", "kv_channels", value=lambda f: f["v_head_dim"]),   # MLA outputs v_head_dim per head
    Row("rotary_base", "rotary_base", "rope_theta"),
    Row("layernorm_epsilon", "layernorm_epsilon", "rms_norm_eps"),
    Row("rope_type", "rope_type", value=lambda f: "yarn" if f.get("rope_scaling") is not None else "rope"),
    Row("rotary_scaling_factor", "rotary_scaling_factor", "rope_scaling.factor",
        value=lambda f: float(f["rope_scaling"]["factor"]) if f.get("rope_scaling") is not None else 1.0),
    Row("mscale", "mscale", "rope_scaling.mscale", when="yarn"),
    Row("mscale_all_dim", "mscale_all_dim", "rope_scaling.mscale_all_dim", when="yarn"),
    Row("yarn_original_max_position_embeddings", "original_max_position_embeddings",
        "rope_scaling.original_max_position_embeddings", when="yarn"),
    Row("yarn_beta_fast", "beta_fast", "rope_scaling.beta_fast", when="yarn"),
    Row("yarn_beta_slow", "beta_slow", "rope_scaling.beta_slow", when="yarn"),
    # --- DeepSeekMoE --------------------------------------------------------------------------
    Row("num_experts", "num_moe_experts", "n_routed_experts", when="moe", off=None),
    Row("moe_ffn_hidden_size", "moe_ffn_hidden_size", "moe_intermediate_size", when="moe"),
    Row("moe_router_topk", "moe_router_topk", "num_experts_per_tok", when="moe"),
    Row("moe_shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", when="moe",
        value=lambda f: f["n_shared_experts"] * f["moe_intermediate_size"] if f["n_shared_experts"] else None),
    Row("moe_router_num_groups", "moe_router_num_groups", "n_group", when="moe",
        value=lambda f: f["n_group"] if f["n_group"] > 1 else None),
    Row("moe_router_group_topk", "moe_router_group_topk", "topk_group", when="moe",
        value=lambda f: f["topk_group"] if f["n_group"] > 1 else None),
    Row("moe_router_topk_scaling_factor", "moe_router_topk_scaling_factor", "routed_scaling_factor", when="moe"),
    Row("moe_router_score_function", "moe_router_score_function", "scoring_func", when="moe"),
    Row("moe_router_enable_expert_bias", "moe_router_enable_expert_bias", when="moe",
        value=lambda f: f["scoring_func"] == "sigmoid"),
    # gamma only moves a bias that exists (sigmoid routing); 0 otherwise
    Row("moe_router_bias_update_rate", "moe_router_bias_update_rate", "bias_update_rate", when="moe",
        value=lambda f: f["bias_update_rate"] if f["scoring_func"] == "sigmoid" else 0.0),
    Row("moe_aux_loss_coeff", "moe_aux_loss_coeff", "seq_aux_alpha", when="moe"),
    Row("moe_layer_freq", "moe_layer_freq", value=moe_layer_pattern, when="moe"),
    _fixed("moe_router_load_balancing_type", "moe_router_load_balancing_type", "seq_aux_loss",
           "DSv3 balances with the expert bias + the sequence-wise loss", when="moe", as_flag=lambda v: [v]),
    _fixed("moe_router_pre_softmax", "moe_router_pre_softmax", False, "DSv3 normalises after top-k", when="moe"),
    # a registered dispatcher (token_dispatcher, set from --moe-token-dispatcher-type by the launcher):
    # Megatron sees the name of the Megatron dispatcher whose behaviour it provides
    Row("moe_token_dispatcher_type", "moe_token_dispatcher_type", value=_megatron_dispatcher,
        when="registered_dispatcher", passthrough=True),
    Row("moe_dispatch_fp8", None, "moe_dispatch_fp8"),
    Row("fp8_emulation", None, "fp8_emulation"),
    _fixed("moe_router_dtype", "moe_router_dtype", "fp32", "DSv3 routes in fp32", when="moe"),
    # --- MTP ----------------------------------------------------------------------------------
    Row("mtp_loss_scaling_factor", "mtp_loss_scaling_factor", "mtp_lambda", when="mtp", off=0.0),
    # --- flags megatron-dsv3 adds (same name as the DSv3 field; no Megatron-Core field) ---------
    Row("n_shared_experts", None, "n_shared_experts"),
    Row("first_k_dense_replace", None, "first_k_dense_replace"),
    Row(None, None, "moe_layer_interval"),          # set through --moe-layer-freq (see the launcher)
    Row("norm_topk_prob", None, "norm_topk_prob"),
    # --- fixed by the architecture ------------------------------------------------------------
    _fixed("multi_latent_attention", "multi_latent_attention", True, "DSv3 attention is MLA"),
    _fixed("normalization", "normalization", "RMSNorm", "DSv3 uses RMSNorm"),
    _fixed("swiglu", "gated_linear_unit", True, "DSv3 FFNs are SwiGLU"),
    _fixed(None, "activation_func", F.silu, "SwiGLU gates with SiLU"),
    _fixed("add_bias_linear", "add_bias_linear", False, "DSv3 linears have no bias"),
    _fixed("qk_layernorm", "qk_layernorm", True, "DSv3 normalises the q and kv latents"),
    _fixed("untie_embeddings_and_output_weights", None, True, "DSv3 has separate embedding and head"),
    _fixed("position_embedding_type", None, "none", "MLA applies its decoupled RoPE itself"),
)

#: Megatron-Core fields derived from the DSv3 fields. A builder that starts from Megatron's own
#: translation of its flags leaves these at their defaults (tests/test_config.py checks completeness).
DERIVED_MEGATRON_FIELDS = frozenset(r.core for r in ROWS if r.core is not None and not r.passthrough)

#: DSv3 field (or ``rope_scaling.<key>``) -> the Megatron-LM flag that sets it.
FLAG_OF_FIELD: dict[str, str] = {r.field: r.flag for r in ROWS if r.field is not None and r.flag is not None}

#: The YaRN keys and their flags.
YARN_KEYS: dict[str, str] = {k.split(".", 1)[1]: v for k, v in FLAG_OF_FIELD.items()
                             if k.startswith("rope_scaling.")}


def flag_name(dest: str) -> str:
    """'moe_router_topk' -> '--moe-router-topk'."""
    return "--" + dest.replace("_", "-")


def megatron_core_values(fields: Mapping) -> dict[str, Any]:
    """{Megatron-Core field: value} the DSv3 fields determine."""
    return {r.core: r.of(fields) for r in ROWS if r.core is not None and r.applies(fields)}


def megatron_arg_values(fields: Mapping) -> dict[str, Any]:
    """{Megatron-LM argument: value} the DSv3 fields determine (Megatron's formats)."""
    out = {}
    for r in ROWS:
        if r.flag is None:
            continue
        if r.applies(fields):
            out[r.flag] = r.as_flag(r.of(fields))
        elif r.off is not _KEEP:
            out[r.flag] = r.off
    return out


def fixed_flags() -> dict[str, tuple[Any, str]]:
    """{Megatron-LM argument: (the only value DSv3 allows, why)}."""
    return {r.flag: (r.of({}), r.why) for r in ROWS if r.fixed and r.flag is not None}
