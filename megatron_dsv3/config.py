"""DeepSeek-V3 configuration: one dataclass on top of Megatron-Core's ``MLATransformerConfig``.

The DSv3 fields below (HF ``config.json`` names where one exists) are the source of truth. From
them ``__post_init__`` derives the Megatron-Core fields that mean the same thing (``num_moe_experts``,
``moe_router_group_topk``, ``qk_head_dim`` ...), so Megatron's own code (dispatchers, finalize_model_grads,
checkpointing, the training loop) sees a consistent config. A Megatron field set by hand to something
different from what the DSv3 field implies is an error, never silently overwritten.

Nothing defaults to a non-DSv3 value: fields without a DSv3 meaning-neutral default are ``None`` and
must be given (a preset gives them all). Paper = DeepSeek-V3 Technical Report (arXiv 2412.19437).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig

_UNSET = object()


class DSv3ConfigError(ValueError):
    """A configuration that is not a valid DeepSeek-V3-style model; the message names the field."""


@dataclass
class DSv3Config(MLATransformerConfig):
    # ---------------- model shape ----------------
    vocab_size: Optional[int] = None
    """Vocabulary size (671B: 129280)."""

    max_position_embeddings: Optional[int] = None
    """Longest sequence the model is built for (671B: 163840 = 4096 * 40 with YaRN)."""

    first_k_dense_replace: Optional[int] = None
    """The first k decoder layers use a dense SwiGLU FFN, the rest MoE (671B: 3; paper sec. 4.2)."""

    # ---------------- MLA (paper sec. 2.1.1) ----------------
    q_lora_rank: Optional[int] = _UNSET  # type: ignore[assignment]
    """Query low-rank dimension d_c' (671B: 1536); None = plain q projection (DeepSeek-V2-Lite)."""

    kv_lora_rank: Optional[int] = None  # type: ignore[assignment]
    """KV latent dimension d_c (671B: 512)."""

    qk_nope_head_dim: Optional[int] = None
    """Per-head query/key dimension without RoPE (671B: 128)."""

    qk_rope_head_dim: Optional[int] = None
    """Decoupled RoPE dimension d_h^R, one shared key head (671B: 64)."""

    v_head_dim: Optional[int] = None  # type: ignore[assignment]
    """Per-head value dimension (671B: 128)."""

    rope_theta: Optional[float] = None
    """RoPE base (671B: 10000)."""

    rope_scaling: Optional[dict] = _UNSET  # type: ignore[assignment]
    """YaRN parameters as in HF config.json ({type: yarn, factor, original_max_position_embeddings,
    beta_fast, beta_slow, mscale, mscale_all_dim}); None = plain RoPE. 671B: factor 40, original 4096,
    beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 1."""

    # ---------------- DeepSeekMoE (paper sec. 2.1.2) ----------------
    moe_intermediate_size: Optional[int] = None
    """Width of each routed expert (671B: 2048)."""

    n_routed_experts: Optional[int] = None
    """Number of routed experts (671B: 256)."""

    n_shared_experts: Optional[int] = None
    """Number of shared experts, fused into one SwiGLU of width n * moe_intermediate_size (671B: 1)."""

    num_experts_per_tok: Optional[int] = None
    """Routed experts per token K_r (671B: 8)."""

    n_group: Optional[int] = None
    """Expert groups for group-limited routing; in training the nodes holding the experts (671B: 8)."""

    topk_group: Optional[int] = None
    """Groups kept per token, M in node-limited routing (671B: 4)."""

    routed_scaling_factor: Optional[float] = None
    """Multiplier on the normalised routed weights (671B: 2.5)."""

    scoring_func: str = "sigmoid"
    """'sigmoid' (DSv3, aux-loss-free bias routing) or 'softmax' (DeepSeek-V2)."""

    norm_topk_prob: Optional[bool] = None
    """Renormalise the chosen (unbiased) scores to sum 1 (671B: true)."""

    bias_update_rate: Optional[float] = None
    """gamma: after each step each expert bias moves by gamma against its load (paper: 0.001, 0 for
    the last 500B tokens). No gradient flows into the bias."""

    seq_aux_alpha: Optional[float] = None
    """alpha of the complementary sequence-wise balance loss (paper: 0.0001). Must be given; 0.0
    disables the loss explicitly."""

    # ---------------- MTP (paper sec. 2.2) ----------------
    mtp_lambda: Optional[float] = None
    """lambda: L_MTP = lambda / D * sum_k CE_k (paper: 0.3 for the first 10T tokens, then 0.1)."""

    # ---------------- misc ----------------
    rms_norm_eps: Optional[float] = None
    """RMSNorm epsilon (671B: 1e-6)."""

    ranks_per_node: Optional[int] = None
    """Cluster topology, not model shape: GPUs per node (DSv3 training: 8). Used for the cross-node
    routing metric; None = not known (the metric is not computed)."""

    def __post_init__(self):
        self._check_dsv3_fields()
        self._derive_megatron_fields()
        self._check_parallel()
        super().__post_init__()

    # ------------------------------------------------------------------
    def _need(self, name: str, hint: str = ""):
        value = getattr(self, name)
        if value is None or value is _UNSET:
            raise DSv3ConfigError(
                f"DSv3Config.{name} is not set. {hint}Use a preset (DSv3Config.from_preset) or "
                f"from_hf_config(config.json), or pass {name}=... explicitly."
            )
        return value

    def _check_dsv3_fields(self):
        for name in ("vocab_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings"):
            self._need(name)
        if self.num_layers <= 0 or self.hidden_size <= 0 or self.num_attention_heads <= 0:
            raise DSv3ConfigError("DSv3Config.num_layers, hidden_size and num_attention_heads must be > 0")
        if self.q_lora_rank is _UNSET:
            raise DSv3ConfigError(
                "DSv3Config.q_lora_rank is not set: give the query low-rank size (671B: 1536) or None "
                "for a plain query projection (DeepSeek-V2-Lite). Megatron's MLA default (512) is not "
                "inherited.")
        if self.rope_scaling is _UNSET:
            raise DSv3ConfigError(
                "DSv3Config.rope_scaling is not set: give the YaRN dict (671B: factor 40, "
                "original_max_position_embeddings 4096, beta_fast 32, beta_slow 1, mscale 1, "
                "mscale_all_dim 1) or None for plain RoPE.")
        if self.qk_rope_head_dim % 2:
            raise DSv3ConfigError(f"DSv3Config.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise DSv3ConfigError(
                    f"DSv3Config.rope_scaling type {kind!r} is not supported: only 'yarn' or None")
            for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                        "mscale", "mscale_all_dim"):
                if key not in self.rope_scaling:
                    raise DSv3ConfigError(f"DSv3Config.rope_scaling is missing {key!r}")
        self._need("first_k_dense_replace")
        if not 0 <= self.first_k_dense_replace <= self.num_layers:
            raise DSv3ConfigError(
                f"DSv3Config.first_k_dense_replace={self.first_k_dense_replace} must be in "
                f"[0, num_layers={self.num_layers}]")
        if self.ffn_hidden_size is None and self.first_k_dense_replace > 0:
            raise DSv3ConfigError("DSv3Config.ffn_hidden_size (dense intermediate_size) is not set")
        if self.first_k_dense_replace < self.num_layers or self.mtp_num_layers:
            self._check_moe_fields()
        if self.mtp_num_layers:
            self._need("mtp_lambda", "With mtp_num_layers > 0 the MTP loss weight is required (paper: 0.3). ")

    def _check_moe_fields(self):
        hint_alpha = "The paper uses alpha=0.0001; set 0.0 to disable the sequence-wise balance loss. "
        for name in ("moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                     "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
                     "norm_topk_prob"):
            self._need(name)
        self._need("seq_aux_alpha", hint_alpha)
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise DSv3ConfigError(f"DSv3Config.scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.scoring_func == "sigmoid":
            self._need("bias_update_rate", "The paper uses gamma=0.001 (0 to freeze the bias). ")
        E, G, M, K = self.n_routed_experts, self.n_group, self.topk_group, self.num_experts_per_tok
        if G < 1 or E % G:
            raise DSv3ConfigError(
                f"DSv3Config.n_group={G} must divide n_routed_experts={E}: choose n_group among the "
                f"divisors of {E}")
        if not 1 <= M <= G:
            raise DSv3ConfigError(f"DSv3Config.topk_group={M} must be in [1, n_group={G}]")
        if not 1 <= K <= M * (E // G):
            raise DSv3ConfigError(
                f"DSv3Config.num_experts_per_tok={K} exceeds the experts in the kept groups "
                f"(topk_group {M} x {E // G} experts per group = {M * (E // G)}): raise topk_group or "
                f"lower num_experts_per_tok")
        if G > 1 and self.scoring_func == "sigmoid" and E // G < 2:
            raise DSv3ConfigError(
                f"DSv3Config: group score is the sum of the top-2 experts of a group, so each of the "
                f"n_group={G} groups needs >= 2 experts (n_routed_experts={E})")
        if self.seq_aux_alpha < 0 or (self.bias_update_rate or 0) < 0:
            raise DSv3ConfigError("DSv3Config.seq_aux_alpha and bias_update_rate must be >= 0")

    # ------------------------------------------------------------------
    def _set(self, name, value, default):
        """Set a Megatron field from a DSv3 field; refuse a conflicting hand-set value."""
        current = getattr(self, name)
        if current != default and current != value:
            raise DSv3ConfigError(
                f"DSv3Config: Megatron field {name}={current!r} conflicts with the DSv3 fields, which "
                f"imply {value!r}. Set the DSv3 field instead and leave {name} unset.")
        setattr(self, name, value)

    def _derive_megatron_fields(self):
        defaults = {f.name: f.default for f in dataclasses.fields(MLATransformerConfig)
                    if f.default is not dataclasses.MISSING}
        s = lambda name, value: self._set(name, value, defaults.get(name))  # noqa: E731
        s("multi_latent_attention", True)
        s("qk_head_dim", self.qk_nope_head_dim)
        s("qk_pos_emb_head_dim", self.qk_rope_head_dim)
        s("normalization", "RMSNorm")
        s("layernorm_epsilon", self.rms_norm_eps)
        s("rotary_base", self.rope_theta)
        s("add_bias_linear", False)
        s("gated_linear_unit", True)
        self.activation_func = F.silu
        self.qk_layernorm = True  # DSv3 normalises the q and kv latents
        # Megatron's MLA reads kv_channels; DSv3 attention outputs v_head_dim per head.
        self.kv_channels = self.v_head_dim
        if self.rope_scaling is not None:
            r = self.rope_scaling
            self.rope_type = "yarn"
            self.rotary_scaling_factor = float(r["factor"])
            self.original_max_position_embeddings = int(r["original_max_position_embeddings"])
            self.beta_fast = float(r["beta_fast"])
            self.beta_slow = float(r["beta_slow"])
            self.mscale = float(r["mscale"])
            self.mscale_all_dim = float(r["mscale_all_dim"])
        else:
            self.rope_type = "rope"
            self.rotary_scaling_factor = 1.0
        moe_layers = self.first_k_dense_replace < self.num_layers or bool(self.mtp_num_layers)
        if moe_layers:
            s("num_moe_experts", self.n_routed_experts)
            s("moe_ffn_hidden_size", self.moe_intermediate_size)
            s("moe_router_topk", self.num_experts_per_tok)
            s("moe_shared_expert_intermediate_size",
              self.n_shared_experts * self.moe_intermediate_size if self.n_shared_experts else None)
            s("moe_router_num_groups", self.n_group if self.n_group > 1 else None)
            s("moe_router_group_topk", self.topk_group if self.n_group > 1 else None)
            s("moe_router_topk_scaling_factor", self.routed_scaling_factor)
            s("moe_router_score_function", self.scoring_func)
            s("moe_router_enable_expert_bias", self.scoring_func == "sigmoid")
            if self.scoring_func == "sigmoid":
                s("moe_router_bias_update_rate", self.bias_update_rate)
            s("moe_router_load_balancing_type", "seq_aux_loss")
            s("moe_aux_loss_coeff", self.seq_aux_alpha)
            s("moe_router_dtype", "fp32")
            s("moe_router_pre_softmax", False)
            s("moe_layer_freq", [0] * self.first_k_dense_replace
              + [1] * (self.num_layers - self.first_k_dense_replace))
        if self.mtp_num_layers:
            s("mtp_loss_scaling_factor", self.mtp_lambda)
        if self.ffn_hidden_size is None:  # all-MoE model: Megatron still wants a value
            self.ffn_hidden_size = self.moe_intermediate_size

    def _check_parallel(self):
        tp, ep = self.tensor_model_parallel_size, self.expert_model_parallel_size
        if self.num_attention_heads % tp:
            raise DSv3ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}: choose a TP size that divides the head count")
        if self.num_moe_experts and self.num_moe_experts % ep:
            raise DSv3ConfigError(
                f"n_routed_experts={self.num_moe_experts} is not divisible by "
                f"expert_model_parallel_size={ep}: choose an EP size that divides the expert count")
        if self.num_moe_experts and tp > 1 and not self.sequence_parallel:
            raise DSv3ConfigError(
                "MoE with tensor_model_parallel_size > 1 needs sequence_parallel=True "
                "(--sequence-parallel)")
        if self.vocab_size % tp:
            raise DSv3ConfigError(
                f"vocab_size={self.vocab_size} is not divisible by tensor_model_parallel_size={tp}")
        if self.context_parallel_size != 1:
            raise DSv3ConfigError("context_parallel_size > 1 is not supported by megatron-dsv3's MLA yet")

    # ------------------------------------------------------------------
    @property
    def mla_softmax_scale(self) -> float:
        """(d_nope + d_rope)^-0.5 * m^2 with m = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.rope_scaling is not None and self.rope_scaling["factor"] > 1:
            m = 0.1 * self.rope_scaling["mscale_all_dim"] * math.log(self.rope_scaling["factor"]) + 1.0
            scale *= m * m
        return scale

    @property
    def moe_layer_numbers(self) -> list[int]:
        """0-based indices of the decoder layers that are MoE."""
        return list(range(self.first_k_dense_replace, self.num_layers))

    # ------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DSv3Config":
        if name not in PRESETS:
            raise DSv3ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = dict(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_config(cls, path_or_dict, *, seq_aux_alpha=None, bias_update_rate=None, mtp_lambda=None,
                       **overrides) -> "DSv3Config":
        """Build from a HF DeepSeek-V3 / V2 ``config.json`` (path, directory or dict).

        HF configs carry no training coefficients. ``seq_aux_alpha``, ``bias_update_rate`` and
        ``mtp_lambda`` must therefore be passed (or set in ``overrides``) for MoE / MTP models; a
        missing one is an error naming it, never a silent 0.
        """
        hf = _read_hf_config(path_or_dict)
        kw = hf_to_config_kwargs(hf)
        kw.update(seq_aux_alpha=seq_aux_alpha, bias_update_rate=bias_update_rate, mtp_lambda=mtp_lambda)
        kw.update(overrides)
        return cls(**kw)

    def hf_dict(self) -> dict:
        """The HF DeepSeek-V3 config.json this configuration corresponds to."""
        return {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size, "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_shared_experts": self.n_shared_experts, "n_routed_experts": self.n_routed_experts,
            "routed_scaling_factor": self.routed_scaling_factor, "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim, "qk_nope_head_dim": self.qk_nope_head_dim,
            "n_group": self.n_group, "topk_group": self.topk_group,
            "num_experts_per_tok": self.num_experts_per_tok,
            "first_k_dense_replace": self.first_k_dense_replace, "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": self.scoring_func,
            "topk_method": "noaux_tc" if self.scoring_func == "sigmoid" else "greedy",
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": False, "num_nextn_predict_layers": self.mtp_num_layers or 0,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
            "torch_dtype": "bfloat16",
        }


def _read_hf_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no HF config at {path}")
    with open(path) as f:
        return json.load(f)


def hf_to_config_kwargs(hf: dict) -> dict:
    """Map HF config.json keys to DSv3Config keyword arguments (no training coefficients)."""
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise DSv3ConfigError(f"config.json model_type {model_type!r} is not deepseek_v3 / deepseek_v2")
    topk_method = hf.get("topk_method", "noaux_tc")
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring == "sigmoid" and topk_method != "noaux_tc":
        raise DSv3ConfigError(f"config.json: sigmoid scoring needs topk_method noaux_tc, got {topk_method!r}")
    if hf.get("tie_word_embeddings"):
        raise DSv3ConfigError("config.json: tie_word_embeddings=true is not a DeepSeek-V3 model")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise DSv3ConfigError("config.json: num_key_value_heads must equal num_attention_heads for MLA")
    rope_theta = hf.get("rope_theta")
    rope_scaling = hf.get("rope_scaling")
    if "rope_parameters" in hf:        # transformers >= 5 writes RoPE settings here
        params = dict(hf["rope_parameters"] or {})
        rope_theta = params.pop("rope_theta", rope_theta)
        rope_scaling = params if params.get("rope_type", "default") != "default" else None
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        rope_scaling.setdefault("type", rope_scaling.get("rope_type"))
    if rope_theta is None:
        raise DSv3ConfigError("config.json has no rope_theta")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], max_position_embeddings=hf["max_position_embeddings"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 0),
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rope_theta=float(rope_theta),
        rope_scaling=rope_scaling, moe_intermediate_size=hf["moe_intermediate_size"],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"], n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, routed_scaling_factor=float(hf["routed_scaling_factor"]),
        scoring_func=scoring, norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        mtp_num_layers=hf.get("num_nextn_predict_layers") or None,
    )


#: The Megatron-Core fields ``_derive_megatron_fields`` sets from the DSv3 fields. A builder that starts
#: from Megatron's own translation of its flags leaves these at their defaults (tested to be complete).
DERIVED_MEGATRON_FIELDS = frozenset({
    "multi_latent_attention", "qk_head_dim", "qk_pos_emb_head_dim", "normalization", "layernorm_epsilon",
    "rotary_base", "add_bias_linear", "gated_linear_unit", "activation_func", "qk_layernorm", "kv_channels",
    "rope_type", "rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk",
    "moe_shared_expert_intermediate_size", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_topk_scaling_factor", "moe_router_score_function", "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
    "moe_router_dtype", "moe_router_pre_softmax", "moe_layer_freq", "mtp_loss_scaling_factor",
    "ffn_hidden_size",
})


_DSV3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    # DeepSeek-V3 671B (HF config.json of deepseek-ai/DeepSeek-V3; training coefficients from the paper)
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, ffn_hidden_size=18432, moe_intermediate_size=2048,
        num_layers=61, first_k_dense_replace=3, num_attention_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        scoring_func="sigmoid", norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_scaling=_DSV3_YARN, max_position_embeddings=163840, rms_norm_eps=1e-6,
        mtp_num_layers=1, mtp_lambda=0.3, bias_update_rate=0.001, seq_aux_alpha=0.0001,
    ),
    # DeepSeek-V2-Lite 16B: no q low-rank, softmax greedy routing, 2 shared experts, no MTP.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, ffn_hidden_size=10944, moe_intermediate_size=1408,
        num_layers=27, first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        scoring_func="softmax", norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=163840, rms_norm_eps=1e-6, mtp_num_layers=None,
        bias_update_rate=None, seq_aux_alpha=0.001,
    ),
    # A few-MB model with every DSv3 feature switched on, for CPU runs and tests.
    "tiny": dict(
        vocab_size=256, hidden_size=64, ffn_hidden_size=128, moe_intermediate_size=32,
        num_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        scoring_func="sigmoid", norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=128, rms_norm_eps=1e-6, mtp_num_layers=1, mtp_lambda=0.3,
        bias_update_rate=0.001, seq_aux_alpha=0.0001,
    ),
}


def cpu_overrides() -> dict:
    """Megatron-Core settings every CPU run needs (fp32, CPU init, no fused kernels)."""
    return dict(
        transformer_impl="local", use_cpu_initialization=True, params_dtype=torch.float32,
        bf16=False, fp16=False,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        moe_grouped_gemm=False, moe_permute_fusion=False, moe_router_fusion=False,
        cross_entropy_loss_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
    )
