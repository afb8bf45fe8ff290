"""DeepSeek-V3 configuration: one dataclass on top of Megatron-Core's ``MLATransformerConfig``.

The DSv3 fields below (HF ``config.json`` names where one exists) are the source of truth. From
them ``__post_init__`` derives the Megatron-Core fields that mean the same thing (the table in
:mod:`megatron_dsv3.config.mapping`), so Megatron's own code (dispatchers, finalize_model_grads,
checkpointing, the training loop) sees a consistent config. A Megatron field set by hand to something
different from what the DSv3 field implies is an error, never silently overwritten.

Nothing defaults to a non-DSv3 value: fields without a DSv3 meaning-neutral default are ``None`` and
must be given (a preset gives them all). Paper = DeepSeek-V3 Technical Report (arXiv 2412.19437).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import MLATransformerConfig

from .layout import DSv3ConfigError, check_parallel_layout
from .mapping import has_moe, megatron_core_values, moe_layer_pattern

_UNSET = object()

#: The fields DSv3Config adds to MLATransformerConfig (the DSv3 fields proper are these plus the
#: shared shape fields num_layers, hidden_size, ffn_hidden_size, num_attention_heads, mtp_num_layers).
@dataclass
class DSv3Config(MLATransformerConfig):
    # ---------------- model shape ----------------
    vocab_size: Optional[int] = None
    """Vocabulary size (671B: 129280)."""

    max_position_embeddings: Optional[int] = None
    """Longest sequence the model is built for (671B: 163840 = 4096 * 40 with YaRN)."""

    first_k_dense_replace: Optional[int] = None
    """The first k decoder layers use a dense SwiGLU FFN, the rest MoE (671B: 3; paper sec. 4.2)."""

    moe_layer_interval: int = 1
    """HF config.json's ``moe_layer_freq``: a layer i >= first_k_dense_replace is MoE when
    i % moe_layer_interval == 0, dense otherwise (every released DeepSeek model: 1)."""

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

    # ---------------- training ----------------
    hidden_dropout: float = 0.0
    """Dropout on the attention and FFN outputs. DeepSeek-V3 trains without dropout (Megatron-Core's
    default is 0.1)."""

    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (DeepSeek-V3: none; Megatron-Core's default is 0.1)."""

    # ---------------- misc ----------------
    rms_norm_eps: Optional[float] = None
    """RMSNorm epsilon (671B: 1e-6)."""

    ranks_per_node: Optional[int] = None
    """Cluster topology, not model shape: GPUs per node (DSv3 training: 8). Used for the cross-node
    routing metric and by the ``node_limited`` dispatcher (required there); None = not known."""

    token_dispatcher: Optional[str] = None
    """A token dispatcher registered by megatron-dsv3 (``megatron_dsv3.registry.DISPATCHERS``, e.g.
    ``node_limited``: report sec. 3.2.2). Megatron-Core's ``moe_token_dispatcher_type`` then names the
    Megatron dispatcher whose behaviour it provides. None: Megatron-Core's own dispatcher.
    (``moe_token_dispatcher_type="node_limited"`` given directly is read as this field.)"""

    moe_dispatch_fp8: bool = False
    """Send the activations dispatched to the experts as FP8 e4m3 with one fp32 scale per 1x128 tile
    (report sec. 3.3); combine stays in the training dtype. Needs a dispatcher that supports it
    (``node_limited``)."""

    fp8_emulation: bool = False
    """Build the emulated-FP8 layers (``megatron_dsv3/model/fp8_emulation.py``: e4m3 1x128 / 128x128
    tile quantisation of the GEMM inputs, on any device, without Transformer Engine). Needs
    ``transformer_impl='local'`` and ``gradient_accumulation_fusion=False``. Real FP8 on a GPU is
    ``fp8='e4m3'`` with Transformer Engine."""

    def __post_init__(self):
        self._read_registered_dispatcher()
        self._check_fp8_emulation()
        self._check_dsv3_fields()
        self._derive_megatron_fields()
        check_parallel_layout(
            num_attention_heads=self.num_attention_heads,
            n_routed_experts=self.n_routed_experts if self.has_moe else None,
            tp=self.tensor_model_parallel_size, ep=self.expert_model_parallel_size,
            sequence_parallel=self.sequence_parallel, cp=self.context_parallel_size,
            vocab_size=self.vocab_size)
        super().__post_init__()

    # ------------------------------------------------------------------
    def dsv3_fields(self) -> dict:
        """{field: value} of the DSv3 fields (what the mapping table reads)."""
        return {name: getattr(self, name) for name in DSV3_FIELDS}

    @property
    def has_moe(self) -> bool:
        return has_moe(self.dsv3_fields())

    def is_moe_layer(self, layer: int) -> bool:
        """Is 0-based decoder layer ``layer`` MoE? (MTP modules always are.)"""
        return layer >= self.num_layers or bool(moe_layer_pattern(self.dsv3_fields())[layer])

    @property
    def moe_layer_numbers(self) -> list[int]:
        """0-based indices of the decoder layers that are MoE."""
        return [i for i, moe in enumerate(moe_layer_pattern(self.dsv3_fields())) if moe]

    def _need(self, name: str, hint: str = ""):
        value = getattr(self, name)
        if value is None or value is _UNSET:
            raise DSv3ConfigError(
                f"DSv3Config.{name} is not set. {hint}Use a preset (DSv3Config.from_preset) or "
                f"from_hf_config(config.json), or pass {name}=... explicitly."
            )
        return value

    def _check_fp8_emulation(self):
        if not self.fp8_emulation:
            return
        if self.transformer_impl != "local":
            raise DSv3ConfigError("DSv3Config.fp8_emulation=True replaces Megatron-Core's local layers: set "
                                  "transformer_impl='local' (--transformer-impl local); real FP8 on a GPU is "
                                  "--fp8-format with Transformer Engine")
        if self.gradient_accumulation_fusion:
            raise DSv3ConfigError("DSv3Config.fp8_emulation=True: set gradient_accumulation_fusion=False "
                                  "(--no-gradient-accumulation-fusion)")
        if self.fp8:
            raise DSv3ConfigError(f"DSv3Config.fp8_emulation=True with fp8={self.fp8!r}: choose one "
                                  "(emulation without Transformer Engine, or real FP8 with it)")

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
        if not isinstance(self.moe_layer_interval, int) or self.moe_layer_interval < 1:
            raise DSv3ConfigError(f"DSv3Config.moe_layer_interval={self.moe_layer_interval!r} must be an "
                                  "integer >= 1 (HF moe_layer_freq)")
        if self.ffn_hidden_size is None and len(self.moe_layer_numbers) < self.num_layers:
            raise DSv3ConfigError("DSv3Config.ffn_hidden_size (dense intermediate_size) is not set")
        if self.has_moe:
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

    def _read_registered_dispatcher(self):
        """moe_token_dispatcher_type naming a dispatcher megatron-dsv3 registered -> token_dispatcher."""
        from ..registry import registered_dispatcher

        if self.token_dispatcher is None and registered_dispatcher(self.moe_token_dispatcher_type) is not None:
            self.token_dispatcher = self.moe_token_dispatcher_type
            self.moe_token_dispatcher_type = next(
                f.default for f in dataclasses.fields(MLATransformerConfig) if f.name == "moe_token_dispatcher_type")
        if self.token_dispatcher is not None and registered_dispatcher(self.token_dispatcher) is None:
            from ..registry import names, DISPATCHERS

            raise DSv3ConfigError(f"DSv3Config.token_dispatcher={self.token_dispatcher!r} is not a dispatcher "
                                  f"class registered by megatron-dsv3; registered: {names(DISPATCHERS)}")

    # ------------------------------------------------------------------
    def _derive_megatron_fields(self):
        """Set the Megatron-Core fields of the mapping table; refuse a conflicting hand-set value."""
        defaults = {f.name: f.default for f in dataclasses.fields(MLATransformerConfig)
                    if f.default is not dataclasses.MISSING}
        for name, value in megatron_core_values(self.dsv3_fields()).items():
            current = getattr(self, name)
            if current != defaults.get(name) and current != value:
                raise DSv3ConfigError(
                    f"DSv3Config: Megatron field {name}={current!r} conflicts with the DSv3 fields, which "
                    f"imply {value!r}. Set the DSv3 field instead and leave {name} unset.")
            setattr(self, name, value)

    # ------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DSv3Config":
        from .presets import PRESETS

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
        from .hf_config import hf_to_config_kwargs, read_hf_config

        kw = hf_to_config_kwargs(read_hf_config(path_or_dict))
        given = dict(seq_aux_alpha=seq_aux_alpha, bias_update_rate=bias_update_rate, mtp_lambda=mtp_lambda)
        kw.update({k: v for k, v in given.items() if v is not None})
        kw.update(overrides)
        missing = missing_coefficients(kw)
        if missing:
            raise DSv3ConfigError(
                "the HF config has no value for " + ", ".join(f"{name} ({why})" for name, why in missing)
                + "; pass them: DSv3Config.from_hf_config(path, " + ", ".join(f"{name}=..." for name, _ in missing)
                + ") (0.0 disables a term explicitly)")
        return cls(**kw)

    def hf_dict(self) -> dict:
        """The HF DeepSeek-V3 config.json this configuration corresponds to."""
        from .hf_config import config_to_hf_dict

        return config_to_hf_dict(self)


def missing_coefficients(fields: dict) -> list[tuple[str, str]]:
    """[(field, what it is)] for every training coefficient this model uses and ``fields`` lacks."""
    missing = []
    moe = has_moe(fields)
    if moe and fields.get("seq_aux_alpha") is None:
        missing.append(("seq_aux_alpha", "alpha of the sequence-wise balance loss; paper 0.0001"))
    if moe and fields.get("scoring_func", "sigmoid") == "sigmoid" and fields.get("bias_update_rate") is None:
        missing.append(("bias_update_rate", "gamma, the expert-bias update speed; paper 0.001"))
    if fields.get("mtp_num_layers") and fields.get("mtp_lambda") is None:
        missing.append(("mtp_lambda", "the MTP loss weight; paper 0.3"))
    return missing


#: The DSv3 fields (the ones DSv3Config adds, plus the Megatron shape fields it shares).
DSV3_FIELDS = tuple(
    f.name for f in dataclasses.fields(DSv3Config)
    if f.name not in {g.name for g in dataclasses.fields(MLATransformerConfig)}
) + ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "mtp_num_layers",
     "q_lora_rank", "kv_lora_rank", "v_head_dim")
