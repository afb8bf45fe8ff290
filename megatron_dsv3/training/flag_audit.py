"""Megatron-LM flags that act on the modules megatron-dsv3 replaced, and what a launch does with each.

megatron-dsv3 swaps in its own MLA attention, router, MTP depth module, RMSNorm and RoPE (``model/``)
and keeps Megatron-Core's TransformerLayer / TransformerBlock, MoELayer, experts, shared experts,
token dispatchers, MLP and GPTModel. A Megatron-LM flag read only inside a class we replaced does
nothing for our model, so the launch refuses it by name; a flag read by a class we kept is honoured.

:data:`AUDIT` is the table, one :class:`Flag` per option:

- ``honoured``: the flag does what Megatron-LM says, and the note says where. Some are refused under
  a condition (``refuse_when``; the note says which), e.g. a TE-only option with ``--transformer-impl
  local``.
- ``refused``: given with a value other than Megatron-LM's default (or whatever ``refuse_when``
  says), :func:`check_flags` stops the launch before any process group exists, naming the flag, why,
  and what to do.
- ``no effect``: the flag only turns off (or asks for) something our modules already do not do (or
  always do); the note says why accepting it hides nothing.
- ``fixed``: the architecture fixes the value: rows of :mod:`megatron_dsv3.config.mapping` with
  ``fixed=True``, refused there (``checks._check_fixed_and_unsupported``); listed here, not repeated.

The model-shape flags of the mapping table (``--num-layers``, ``--q-lora-rank``, YaRN ...) are
``honoured`` entries generated from that table (:func:`audit`). ``python -m
megatron_dsv3.training.flag_audit`` prints the README table.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from ..config.mapping import ROWS, has_moe
from .arguments import LaunchError, build_parser

HONOURED, REFUSED, NO_EFFECT, FIXED = "honoured", "refused", "no effect", "fixed"

#: (args, fields, value, Megatron-LM's default) -> does this launch ask for what we do not do?
Predicate = Callable[[argparse.Namespace, Mapping, Any, Any], bool]

#: Megatron-Core's own dispatcher names (a name registered in megatron_dsv3.registry is ours).
_MEGATRON_DISPATCHERS = ("allgather", "alltoall", "flex")


@dataclass(frozen=True)
class Flag:
    """One audited Megatron-LM option."""

    option: str                       # as typed: '--apply-layernorm-1p'
    status: str                       # HONOURED | REFUSED | NO_EFFECT | FIXED
    note: str                         # README: where it is honoured / why refused and what to do / why no effect
    area: str
    dest: str = ""                    # argparse dest ('' = the option without '--', '-' -> '_')
    refuse_when: Optional[Predicate] = None   # REFUSED default: the value differs from Megatron-LM's default
    error: str = ""                   # the launch error for a conditional refusal (default: the note)
    example: tuple = ()               # extra argv that makes the refusal fire (tests; booleans need none)

    def __post_init__(self):
        if not self.dest:   # '--no-X' options name their dest explicitly (tests check every dest)
            object.__setattr__(self, "dest", self.option.lstrip("-").replace("-", "_"))

    def refuses(self, args: argparse.Namespace, fields: Mapping, default: Any) -> bool:
        when = self.refuse_when or (_differs if self.status == REFUSED else None)
        return when is not None and bool(when(args, fields, getattr(args, self.dest, None), default))


# ----------------------------------------------------------------------------------------------
# Predicates
# ----------------------------------------------------------------------------------------------
def _overlaps_shared_experts(name: str) -> bool:
    from ..registry import registered_dispatcher

    cls = registered_dispatcher(name)
    return name in _MEGATRON_DISPATCHERS or bool(getattr(cls, "overlaps_shared_experts", False))


def _differs(args, fields, value, default) -> bool:
    return value != default


def _set(args, fields, value, default) -> bool:
    """Given with anything but 'off' (None, False, 0, an empty list)."""
    return value not in (None, False, 0, 0.0, [], ())


def _not_te(args, fields, value, default) -> bool:
    return value != default and args.transformer_impl != "transformer_engine"


def _not_te_grouped(args, fields, value, default) -> bool:
    return value != default and not (args.transformer_impl == "transformer_engine" and args.moe_grouped_gemm)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
_SDPA = "our MLA's attention core is torch's scaled_dot_product_attention"


_DSA = "DeepSeek-V3.2's sparse attention (DSA) indexer is not supported; drop the --dsa-* flags"


def _family(options: tuple[str, ...], status: str, note: str, area: str, **kw) -> list[Flag]:
    return [Flag(o, status, note, area, **kw) for o in options]


_ATTENTION = [
    Flag("--attention-backend", REFUSED,
         f"only steers Megatron's / Transformer Engine's attention; {_SDPA}, which picks its own kernel "
         "(flash, memory-efficient, cuDNN or math; on CPU model/mla.py's measured rule picks padded-V flash "
         "or, for large q/k heads below 768 tokens, our written-out kernel; logged). Drop --attention-backend (or give auto)",
         "attention", example=("flash",)),
    Flag("--use-flash-attn", REFUSED,
         f"Megatron-Core 0.19.2 reads it nowhere; {_SDPA}, which runs FlashAttention kernels where the "
         "GPU allows. Drop --use-flash-attn", "attention"),
    Flag("--flash-attention-version", REFUSED,
         f"pins Transformer Engine's FlashAttention; {_SDPA}. Drop --flash-attention-version",
         "attention", example=("3",)),
    Flag("--softmax-type", REFUSED,
         "DeepSeek-V3 attention uses the vanilla softmax; our MLA has no off-by-one / learnable softmax. "
         "Drop --softmax-type", "attention", example=("off-by-one",)),
    Flag("--group-query-attention", REFUSED,
         "MLA has no query groups (every head gets its own key and value from the shared latent); drop "
         "--group-query-attention", "attention"),
    Flag("--num-query-groups", REFUSED,
         "MLA has no query groups (every head gets its own key and value from the shared latent); drop "
         "--num-query-groups", "attention", example=("2",)),
    Flag("--kv-channels", REFUSED,
         "our MLA's per-head output width is --v-head-dim (the launcher sets --kv-channels to it); "
         "accepted only equal to it: give --v-head-dim instead", "attention", example=("7",),
         refuse_when=lambda a, f, v, d: v is not None and v != f.get("v_head_dim")),
    Flag("--attention-dropout", HONOURED,
         "megatron_dsv3.model.mla: dropout on the attention probabilities inside SDPA, drawn from Megatron's "
         "model-parallel RNG stream (resumes exactly; DeepSeek-V3 trains without, the launcher sets 0 unless "
         "given)", "attention"),
    Flag("--reset-attention-mask", HONOURED,
         "megatron_dsv3.model.mla: the dataset's document mask (built on every pipeline stage) limits "
         "attention to each document: a packed sequence gives each document's logits run alone", "attention"),
    Flag("--reset-position-ids", HONOURED,
         "with --reset-attention-mask (refused without it): RoPE is relative, so per-document positions give "
         "the same scores; the launch checks say why", "attention"),
    Flag("--no-create-attention-mask-in-dataloader", NO_EFFECT,
         "the data provider builds the document mask exactly when --reset-attention-mask asks for it and "
         "none otherwise (our MLA is causal by construction); refused with --reset-attention-mask, which "
         "needs the mask", "attention", dest="create_attention_mask_in_dataloader",
         refuse_when=lambda a, f, v, d: v is False and bool(a.reset_attention_mask),
         error="--reset-attention-mask needs the document mask the data loader builds; drop "
               "--no-create-attention-mask-in-dataloader", example=("--reset-attention-mask",)),
    Flag("--add-qkv-bias", REFUSED, "DeepSeek-V3 projections have no bias; drop --add-qkv-bias", "attention"),
    Flag("--qk-l2-norm", REFUSED,
         "DeepSeek-V3 RMS-normalises the q and kv latents (fixed), not q/k per head; drop --qk-l2-norm",
         "attention"),
    Flag("--qk-clip", REFUSED,
         "Megatron's QK-clip reads the max logits its own attention core records; our MLA records none. "
         "Drop --qk-clip", "attention"),
    Flag("--qk-clip-alpha", REFUSED, "only used by --qk-clip, which our MLA does not support; drop it",
         "attention", example=("0.3",)),
    Flag("--qk-clip-threshold", REFUSED, "only used by --qk-clip, which our MLA does not support; drop it",
         "attention", example=("50",)),
    Flag("--log-max-attention-logit", REFUSED,
         "reads the max logits Megatron's own attention core records; our MLA records none (it would log "
         "0). Drop --log-max-attention-logit", "attention"),
    Flag("--attention-output-gate", REFUSED,
         "not part of DeepSeek-V3; our MLA has no output gate. Drop --attention-output-gate", "attention"),
    Flag("--apply-query-key-layer-scaling", REFUSED,
         "scales Megatron's own fp16 attention scores; our MLA uses DeepSeek-V3's softmax scale "
         "((dn+dr)^-0.5 x mscale^2). Drop --apply-query-key-layer-scaling", "attention"),
    Flag("--attention-softmax-in-fp32", NO_EFFECT,
         f"{_SDPA}: its fused kernels accumulate the softmax in fp32, and its math fallback upcasts bf16 / "
         "fp16 to fp32 (torch's default), which is what the flag asks of Megatron's unfused softmax",
         "attention"),
    Flag("--no-masked-softmax-fusion", NO_EFFECT,
         "turns off a kernel only Megatron's DotProductAttention uses; our MLA never uses it",
         "attention", dest="masked_softmax_fusion"),
    Flag("--window-size", REFUSED, "DeepSeek-V3 attends over the whole causal context; our MLA has no "
         "sliding window. Drop --window-size", "attention", example=("128,0",)),
    Flag("--window-attn-skip-freq", REFUSED, "only used by --window-size, which our MLA does not support; "
         "drop it", "attention", example=("2",)),
    Flag("--experimental-attention-variant", REFUSED,
         "DSA (DeepSeek-V3.2) and gated delta net replace the attention; megatron-dsv3 builds MLA. Drop it",
         "attention", example=("dsa",)),
    *_family(("--dsa-indexer-n-heads", "--dsa-indexer-head-dim", "--dsa-indexer-topk",
              "--dsa-indexer-topk-freq", "--dsa-indexer-skip-topk-offset", "--dsa-indexer-loss-coeff",
              "--dsa-indexer-k-norm-epsilon"), REFUSED, _DSA, "attention", example=("2",)),
    *_family(("--dsa-indexer-use-sparse-loss", "--dsa-indexer-rope-interleaved", "--dsa-indexer-k-norm-fp32"),
             REFUSED, _DSA, "attention"),
    Flag("--dsa-kernel-backend", REFUSED, _DSA, "attention", example=("tilelang",)),
    Flag("--no-dsa-indexer-rotate-activation", REFUSED, _DSA, "attention", dest="dsa_indexer_rotate_activation"),
    Flag("--no-dsa-indexer-scoring-relu", REFUSED, _DSA, "attention", dest="dsa_indexer_scoring_relu"),
    *_family(("--linear-attention-freq", "--linear-conv-kernel-dim", "--linear-key-head-dim",
              "--linear-value-head-dim", "--linear-num-key-heads", "--linear-num-value-heads"), REFUSED,
             "linear attention (gated delta net) layers are not part of DeepSeek-V3; drop the --linear-* flags",
             "attention", example=("2",)),
    Flag("--use-kitchen-attention", REFUSED,
         "chooses Megatron's Kitchen attention in Megatron's layer spec; our spec builds MLA. Drop it",
         "attention"),
    Flag("--kitchen-attention-backend", REFUSED,
         "only used by --use-kitchen-attention, which our MLA does not support; drop it", "attention",
         example=("fa",)),
    Flag("--mla-down-proj-fusion", REFUSED,
         "fuses Megatron's MLA q/kv down projections; ours keeps them separate (duplicated on TP ranks, HF "
         "layout). Drop --mla-down-proj-fusion", "attention"),
    Flag("--cache-mla-latents", REFUSED,
         "a KV-cache option of Megatron's MLA for inference; our MLA has no KV cache (training only). "
         "Drop it", "attention"),
    Flag("--flash-decode", REFUSED, "inference decoding kernel of Megatron's attention; our MLA has no KV "
         "cache. Drop --flash-decode", "attention"),
    Flag("--batch-invariant-mode", REFUSED,
         f"needs Transformer Engine's batch-invariant FlashAttention path; {_SDPA}. Drop --batch-invariant-mode",
         "attention"),
    Flag("--use-mup", REFUSED,
         "muP changes Megatron's attention softmax scale and output multipliers; our MLA uses DeepSeek-V3's "
         "scale. Drop --use-mup and the --mup-* flags", "attention"),
    *_family(("--mup-width-mult", "--mup-base-hidden-size", "--mup-embedding-mult", "--mup-output-mult",
              "--mup-base-head-dim", "--mup-attn-scale-power"), REFUSED,
             "muP is not supported with DeepSeek-V3 (see --use-mup); drop the --mup-* flags", "attention",
             example=("2",)),
    Flag("--deterministic-mode", HONOURED,
         "global: Megatron turns on torch.use_deterministic_algorithms, which covers our MLA's "
         "scaled_dot_product_attention (torch raises if a kernel has no deterministic variant)", "attention"),
    Flag("--disable-bf16-reduced-precision-matmul", HONOURED,
         "global torch setting (Megatron-Core sets it in the config), so it covers our modules' matmuls too",
         "attention"),
]

_ROPE = [
    Flag("--rope-type", HONOURED,
         "rope or yarn: the launcher's resolve_model_fields switches the model's RoPE (yarn needs the six "
         "YaRN values on a plain-RoPE model); any other value is refused there", "rope"),
    Flag("--rotary-interleaved", REFUSED,
         "our MLA always rotates interleaved pairs (DeepSeek-V3 / HF rope_interleave), and Megatron-Core "
         "rejects the flag with MLA; drop --rotary-interleaved", "rope"),
    Flag("--rotary-percent", REFUSED,
         "RoPE acts on the whole qk_rope_head_dim part in DeepSeek-V3; size it with --qk-pos-emb-head-dim. "
         "Drop --rotary-percent", "rope", example=("0.5",)),
    Flag("--rotary-seq-len-interpolation-factor", REFUSED,
         "position interpolation of Megatron's RotaryEmbedding; DeepSeek-V3 extends context with YaRN "
         "(--rope-type yarn --rotary-scaling-factor ...). Drop it", "rope", example=("2",)),
    Flag("--use-rope-scaling", REFUSED,
         "Llama-3 scaling of Megatron's RotaryEmbedding; DeepSeek-V3 extends context with YaRN "
         "(--rope-type yarn --rotary-scaling-factor ...). Drop it", "rope"),
    Flag("--rope-scaling-factor", REFUSED,
         "the Llama-3 factor of --use-rope-scaling, not YaRN's; give --rotary-scaling-factor (YaRN s)",
         "rope", example=("4",)),
    Flag("--no-rope-freq", REFUSED, "NoPE layers are not part of DeepSeek-V3; drop --no-rope-freq", "rope",
         example=("2",)),
    Flag("--mrope-section", REFUSED, "multimodal RoPE is not part of DeepSeek-V3; drop --mrope-section",
         "rope", example=("16", "24", "24")),
    Flag("--no-yarn-correction-range-round-to-int", REFUSED,
         "our YaRN rounds the correction range to whole dimensions, as DeepSeek-V3 and HF do; drop it",
         "rope", dest="yarn_correction_range_round_to_int", refuse_when=lambda a, f, v, d: v is False),
    Flag("--use-rotary-position-embeddings", REFUSED,
         "legacy switch to Megatron's RotaryEmbedding; MLA applies its decoupled RoPE itself. Drop it",
         "rope"),
    Flag("--no-position-embedding", REFUSED,
         "deprecated in Megatron-LM; DeepSeek-V3 has no learned position embedding anyway (position "
         "embedding type is fixed to none). Drop --no-position-embedding", "rope", dest="add_position_embedding"),
    Flag("--relative-attention-num-buckets", REFUSED,
         "T5 relative attention is not part of DeepSeek-V3; drop it", "rope", example=("64",)),
    Flag("--relative-attention-max-distance", REFUSED,
         "T5 relative attention is not part of DeepSeek-V3; drop it", "rope", example=("64",)),
    Flag("--no-rope-fusion", NO_EFFECT,
         "turns off the fused RoPE kernel of Megatron's attention; our MLA has none (and Megatron-LM "
         "turns it off itself when the position embedding type is not rope)", "rope", dest="apply_rope_fusion"),
]

_NORM = [
    Flag("--apply-layernorm-1p", REFUSED,
         "DeepSeek-V3's RMSNorm multiplies by its gain directly (no 1+w); drop --apply-layernorm-1p",
         "norm", dest="layernorm_zero_centered_gamma"),
    Flag("--no-persist-layer-norm", NO_EFFECT,
         "only Apex's persistent LayerNorm kernel reads it; DeepSeek-V3 normalises with RMSNorm (ours or "
         "Transformer Engine's), which has no such kernel", "norm", dest="no_persist_layer_norm"),
    Flag("--fused-residual-rmsnorm", REFUSED,
         "our layer spec builds no residual-fused norms (Transformer Engine only, opt-in per norm in "
         "Megatron's spec); drop --fused-residual-rmsnorm", "norm"),
    Flag("--apply-wd-to-qk-layernorm", REFUSED,
         "matches parameters named q_layernorm / k_layernorm; our MLA's kv_layernorm would not be matched. "
         "Drop it", "norm"),
    Flag("--no-weight-decay-cond-type", REFUSED,
         "apply_wd_to_qk_layernorm matches q_layernorm / k_layernorm names; our MLA's kv_layernorm would "
         "not be matched. Drop it", "norm", example=("apply_wd_to_qk_layernorm",)),
    Flag("--fp32-residual-connection", REFUSED,
         "our RMSNorm returns the residual stream's dtype, so an fp32 residual would reach the bf16 "
         "projections of MLA and the FFN; not supported. Drop --fp32-residual-connection", "norm"),
    Flag("--apply-residual-connection-post-layernorm", REFUSED,
         "Megatron-Core reads it nowhere; DeepSeek-V3 layers are pre-norm. Drop it", "norm"),
]

_MLP = [
    Flag("--hidden-dropout", HONOURED,
         "Megatron's bias-dropout-add after MLA and after the FFN / MoE (TransformerLayer, kept); the "
         "launcher sets 0 when it is not given (DeepSeek-V3 trains without)", "mlp"),
    *_family(("--squared-relu", "--quick-geglu", "--openai-gelu"), REFUSED,
             "DeepSeek-V3 FFNs are SwiGLU (fixed); drop the activation flag", "mlp"),
    Flag("--glu-linear-offset", REFUSED,
         "not part of DeepSeek-V3's SwiGLU (the HF export and FLOP count would not know it); drop it",
         "mlp", example=("1.0",)),
    Flag("--activation-func-clamp-value", REFUSED,
         "not part of DeepSeek-V3's SwiGLU (the HF export and FLOP count would not know it); drop it",
         "mlp", example=("7.0",)),
    Flag("--use-te-activation-func", REFUSED,
         "our layer spec builds no Transformer Engine activation modules (the dense FFN and shared experts "
         "would apply SiLU without the GLU split); drop --use-te-activation-func", "mlp"),
    Flag("--use-grouped-gemm-for-dense-mlp", REFUSED,
         "chosen in Megatron's layer spec; our dense FFN is Megatron's MLP. Drop it", "mlp"),
    Flag("--use-fused-weighted-squared-relu", REFUSED,
         "a squared-ReLU expert kernel; DeepSeek-V3 experts are SwiGLU. Drop it", "mlp"),
    Flag("--mlp-chunks-for-training", REFUSED,
         "chunks each MoE layer's tokens along the sequence, so our router would compute the sequence-wise "
         "balance loss per chunk instead of per sequence; drop it (or give 1)", "mlp", example=("2",),
         refuse_when=lambda a, f, v, d: (v or 1) > 1 and has_moe(f)),
]

_MOE = [
    Flag("--moe-shared-expert-intermediate-size", HONOURED,
         "a multiple of the expert width; the launcher turns it into --n-shared-experts", "moe"),
    Flag("--moe-layer-freq", HONOURED,
         "the launcher turns it into --first-k-dense-replace and the MoE layer interval (the dense-then-MoE "
         "patterns DeepSeek models have); other patterns are refused there", "moe"),
    Flag("--moe-router-score-function", HONOURED,
         "sets the DSv3 field scoring_func (config/mapping.py): sigmoid (V3) or softmax (V2); sqrtsoftplus "
         "is refused", "moe", refuse_when=lambda a, f, v, d: v not in ("sigmoid", "softmax"),
         error="our router scores with sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2); give one of those",
         example=("sqrtsoftplus",)),
    Flag("--moe-router-enable-expert-bias", HONOURED,
         "our router keeps the DeepSeek-V3 expert bias (selection only, moved by gamma) exactly when it "
         "scores with sigmoid; the launcher sets the flag from the model, and refuses it with softmax",
         "moe", refuse_when=lambda a, f, v, d: bool(v) != (f.get("scoring_func") == "sigmoid"),
         error="our router has the expert bias only with sigmoid scoring (DeepSeek-V3); give "
               "--moe-router-score-function sigmoid or drop it",
         example=("--moe-router-score-function", "softmax")),
    Flag("--moe-router-fusion", REFUSED,
         "the fused top-k kernel of Megatron's TopKRouter; our router computes DeepSeek-V3's group-limited "
         "top-k itself. Drop --moe-router-fusion", "moe"),
    Flag("--moe-z-loss-coeff", REFUSED,
         "the z-loss is computed by Megatron's TopKRouter; our router has no z-loss (DeepSeek-V3 trains "
         "without). Drop --moe-z-loss-coeff", "moe", example=("0.001",), refuse_when=_set),
    Flag("--moe-input-jitter-eps", REFUSED,
         "input jitter is applied by Megatron's TopKRouter; our router applies none. Drop it", "moe",
         example=("0.01",), refuse_when=_set),
    Flag("--moe-enable-routing-replay", REFUSED,
         "routing replay is recorded by Megatron's TopKRouter; our router does not record it. Drop it", "moe"),
    Flag("--moe-router-force-load-balancing", REFUSED,
         "forced balanced routing is a benchmark mode of Megatron's TopKRouter; our router always routes "
         "by score. Drop it", "moe"),
    Flag("--moe-router-force-biased", REFUSED,
         "forced biased routing is a benchmark mode of Megatron's TopKRouter; our router always routes by "
         "score. Drop it", "moe", example=("0.5",), refuse_when=_set),
    Flag("--moe-router-quantile-balancing-ema", REFUSED,
         "belongs to the quantile_balancing load-balancing type; DeepSeek-V3 balances with the expert bias "
         "+ the sequence-wise loss (fixed). Drop it", "moe", example=("0.9",), refuse_when=_set),
    Flag("--moe-routing-trace-path", REFUSED,
         "the routing tracer hooks Megatron's TopKRouter modules; our router is not one, so nothing would "
         "be traced. Drop it", "moe", example=("/tmp/trace",)),
    Flag("--moe-expert-capacity-factor", REFUSED,
         "token dropping is done by Megatron's TopKRouter; DeepSeek-V3 drops no token and our router "
         "routes every token. Drop it", "moe", example=("1.0",),
         refuse_when=lambda a, f, v, d: v is not None and v >= 0),
    Flag("--moe-pad-expert-input-to-capacity", REFUSED,
         "needs --moe-expert-capacity-factor (token dropping), which DeepSeek-V3 does not do; drop it", "moe"),
    Flag("--moe-token-drop-policy", REFUSED,
         "only used with token dropping, which DeepSeek-V3 does not do; drop it", "moe",
         example=("position",)),
    Flag("--moe-expert-rank-capacity-factor", REFUSED,
         "drops tokens over a per-rank budget inside the dispatcher; DeepSeek-V3 drops no token, and our "
         "router's load counts assume every routed token reaches its expert. Drop it", "moe",
         example=("1.5",)),
    Flag("--moe-router-padding-for-quantization", HONOURED,
         "Megatron's token dispatcher pads the routing map for FP8 / FP4 grouped GEMMs (kept; the padded "
         "slots carry weight 0); Megatron-Core requires FP8 / FP4 with it", "moe"),
    Flag("--moe-router-padding-for-fp8", HONOURED,
         "alias of --moe-router-padding-for-quantization (Megatron's token dispatcher, kept)", "moe"),
    Flag("--moe-per-layer-logging", HONOURED,
         "our router records its sequence-wise balance loss per layer in Megatron's MoE metrics tracker, "
         "which logs each layer", "moe"),
    Flag("--moe-use-upcycling", REFUSED,
         "upcycling a dense checkpoint builds Megatron's own MoE layers; start from a DSv3 preset or HF "
         "config instead. Drop it", "moe"),
    Flag("--moe-upcycling-granularity", REFUSED,
         "only used by --moe-use-upcycling, which is not supported; drop it", "moe", example=("2",)),
    Flag("--moe-apply-probs-on-input", REFUSED,
         "weights the expert input instead of its output (top-1 routing only in Megatron-Core); "
         "DeepSeek-V3 weights the outputs of K experts. Drop it", "moe"),
    Flag("--moe-latent-size", REFUSED,
         "latent MoE projections are not part of DeepSeek-V3 (the HF export would not know them); drop it",
         "moe", example=("64",)),
    Flag("--moe-shared-expert-gate", REFUSED,
         "a gated shared expert is not part of DeepSeek-V3 (its shared experts are unweighted; the HF "
         "export has no gate); drop it", "moe"),
    Flag("--moe-shared-expert-overlap", HONOURED,
         "Megatron's MoELayer runs the shared experts inside its token dispatcher (kept); our MoE layer hands "
         "them to a registered dispatcher that declares overlaps_shared_experts (node_limited does); refused "
         "with a registered dispatcher that does not", "moe",
         refuse_when=lambda a, f, v, d: bool(v) and not _overlaps_shared_experts(a.moe_token_dispatcher_type),
         error="the shared experts overlap inside the token dispatcher; this registered dispatcher does not "
               "declare overlaps_shared_experts (their output would be lost). Use a dispatcher that does "
               "(alltoall, node_limited), or drop --moe-shared-expert-overlap"),
    Flag("--use-grouped-gemm-for-shared-expert", REFUSED,
         "needs the grouped shared-expert class of Megatron's MoE spec; our spec builds Megatron's "
         "SharedExpertMLP. Drop it", "moe"),
    Flag("--moe-shared-expert-glu-interleave-size", REFUSED,
         "interleaves the gate and up rows of fc1; the HF key table reads fc1 as [gate; up]. Drop it", "moe",
         example=("32",)),
    Flag("--moe-mlp-glu-interleave-size", REFUSED,
         "interleaves the gate and up rows of each expert's fc1; the HF key table reads fc1 as [gate; up]. "
         "Drop it", "moe", example=("32",)),
    Flag("--moe-grouped-gemm", HONOURED,
         "Transformer Engine backend: Megatron's TEGroupedMLP experts (kept; the HF import / export maps "
         "each HF expert to its grouped weight, experts.linear_fc1.weight{e}). Refused with "
         "--transformer-impl local, whose experts are our grouped-matmul SequentialMLP", "moe",
         refuse_when=_not_te,
         error="grouped expert GEMMs come from Transformer Engine; with --transformer-impl local the experts "
               "are Megatron's SequentialMLP. Use --transformer-impl transformer_engine or drop it",
         example=("--transformer-impl", "local")),
    Flag("--moe-single-grouped-weight", HONOURED,
         "Transformer Engine's grouped expert linears (with --moe-grouped-gemm); refused otherwise", "moe",
         refuse_when=_not_te_grouped,
         error="a single grouped weight is an option of Transformer Engine's grouped expert GEMM; give "
               "--moe-grouped-gemm with --transformer-impl transformer_engine, or drop it",
         example=("--transformer-impl", "local")),
    Flag("--moe-single-grouped-bias", NO_EFFECT,
         "DeepSeek-V3 experts have no bias (--disable-bias-linear is fixed), so there is no bias to group",
         "moe"),
    Flag("--moe-permute-fusion", HONOURED, "Megatron's token dispatchers (kept) fuse the permutation", "moe"),
    Flag("--moe-token-dispatcher-type", HONOURED,
         "resolved through megatron_dsv3.registry (Megatron's allgather / alltoall / flex, or a registered "
         "class) inside our MoE layer", "moe"),
    Flag("--moe-enable-deepep", HONOURED,
         "Megatron's flex dispatcher with DeepEP (kept; it upcasts our router's weights to fp32 as DeepEP "
         "needs)", "moe"),
    Flag("--moe-flex-dispatcher-backend", HONOURED, "Megatron's flex dispatcher (kept)", "moe"),
    Flag("--overlap-moe-expert-parallel-comm", REFUSED,
         "needs the fine-grained schedule plan (GPTModel.build_schedule_plan driven through the forward "
         "step), which the DSv3 forward step and layers do not provide; drop it", "moe"),
    Flag("--delay-wgrad-compute", REFUSED,
         "only used with --overlap-moe-expert-parallel-comm, which is not supported; drop it", "moe"),
    Flag("--ep-overlap-early-attn-memory-release", REFUSED,
         "only used with --overlap-moe-expert-parallel-comm, which is not supported; drop it", "moe"),
    Flag("--overlap-dispatch-backward-with-experts-wgrad", HONOURED,
         "Megatron's MoELayer with Transformer Engine grouped experts (kept); refused otherwise", "moe",
         refuse_when=_not_te_grouped,
         error="delays the wgrad of Transformer Engine's grouped expert GEMM; give --moe-grouped-gemm with "
               "--transformer-impl transformer_engine, or drop it",
         example=("--transformer-impl", "local")),
    Flag("--moe-layer-recompute", HONOURED,
         "= --recompute-modules moe: Megatron's MoELayer checkpoints router, dispatch and experts; our "
         "router counts tokens and adds the balance loss only in the pass with gradients, so once", "moe"),
]

_MTP = [
    Flag("--mtp-use-repeated-layer", REFUSED,
         "DeepSeek-V3 has its own weights per MTP depth (HF model.layers.{L+k-1}); drop it", "mtp"),
    Flag("--mtp-detach-heads", REFUSED,
         "our MTP depth module does not detach its embedding input (only Megatron's own MTP layer does); "
         "drop it", "mtp"),
    Flag("--mtp-hybrid-override-pattern", REFUSED,
         "hybrid (Mamba) MTP layers are not part of DeepSeek-V3; drop it", "mtp", example=("*",)),
]

_RECOMPUTE = [
    Flag("--recompute-granularity", HONOURED,
         "full: Megatron's TransformerBlock checkpoints our decoder layers (uniform / block, "
         "--recompute-num-layers; our router counts tokens and adds its balance loss only in the pass with "
         "gradients, so once); the MTP depth module is not recomputed. selective: the modules of "
         "--recompute-modules", "recompute"),
    Flag("--recompute-method", HONOURED, "Megatron's TransformerBlock (kept), with --recompute-granularity full",
         "recompute"),
    Flag("--recompute-num-layers", HONOURED,
         "Megatron's TransformerBlock (kept), with --recompute-granularity full", "recompute"),
    Flag("--recompute-modules", HONOURED,
         "core_attn and mla_up_proj by megatron_dsv3.model.mla (validated in the launch checks); layernorm "
         "by Megatron's TransformerLayer (input / pre-MLP norms) and our MLA (latent norms; without "
         "Transformer Engine through patch checkpoint_without_output_fp8); mlp by Megatron's TransformerLayer; "
         "moe, shared_experts and moe_act (with --moe-grouped-gemm on TE) by Megatron's MoELayer / experts",
         "recompute"),
    Flag("--recompute-activations", HONOURED, "= --recompute-granularity selective (Megatron-LM)", "recompute"),
    Flag("--distribute-saved-activations", HONOURED,
         "Megatron's checkpoint function, used by TransformerBlock's full recomputation (Megatron-LM "
         "requires TP > 1 without sequence parallelism)", "recompute"),
    Flag("--checkpoint-activations", REFUSED,
         "removed in Megatron-LM (it exits); use --recompute-granularity full --recompute-method uniform",
         "recompute"),
]

_FUSION = [
    Flag("--no-bias-dropout-fusion", HONOURED, "Megatron's bias-dropout-add in TransformerLayer (kept)",
         "fusion", dest="bias_dropout_fusion"),
    Flag("--no-bias-swiglu-fusion", HONOURED,
         "Megatron's fused SwiGLU in the dense FFN, experts and shared experts (kept)", "fusion",
         dest="bias_swiglu_fusion"),
    Flag("--no-bias-gelu-fusion", NO_EFFECT,
         "turns off the GeLU kernel; DeepSeek-V3 is SwiGLU (fixed), and Megatron-LM reads it only without "
         "--swiglu", "fusion", dest="bias_gelu_fusion"),
    Flag("--no-gradient-accumulation-fusion", HONOURED,
         "Megatron's parallel linears (MLA up / output projections, FFN, experts); our duplicated down "
         "projections and router use plain autograd, whose gradient Megatron's DDP adds to main_grad", "fusion",
         dest="gradient_accumulation_fusion"),
    Flag("--cross-entropy-loss-fusion", HONOURED,
         "GPTModel's fused loss (kept), for the LM head and the MTP heads; without it, at TP 1 in fp32 "
         "DSv3GPTModel uses torch's F.cross_entropy", "fusion"),
    Flag("--cross-entropy-fusion-impl", HONOURED, "GPTModel's fused loss (kept, with --cross-entropy-loss-fusion)",
         "fusion"),
    Flag("--fp16-lm-cross-entropy", REFUSED,
         "our model builder computes the LM loss in fp32 (it does not pass this fp16 option to GPTModel); "
         "drop it", "fusion"),
    Flag("--use-transformer-engine-op-fuser", HONOURED,
         "Transformer Engine's fused grouped experts (TEGroupedMLP, with --moe-grouped-gemm); the dense FFN "
         "and shared experts keep Megatron's MLP. Refused without grouped TE experts", "fusion",
         refuse_when=_not_te_grouped,
         error="fuses Transformer Engine's grouped expert GEMMs; give --moe-grouped-gemm with "
               "--transformer-impl transformer_engine, or drop it",
         example=("--transformer-impl", "local")),
]

_FP8_RULES = "training/fp8.py"

_FP8 = [
    Flag("--fp8-format", HONOURED,
         "the Transformer Engine layers of our spec (model/backends.py) run under Megatron-Core's fp8_autocast: "
         "MLA projections, dense FFN, routed and shared experts, the MTP decoder layer; embedding, output head, "
         "MoE gate, RMSNorms, attention core and MTP eh_proj stay BF16 (report sec. 3.3). Refused with local "
         f"layers (use --fp8-emulation), --cpu, without TE, or on a GPU / TE lacking the recipe ({_FP8_RULES})",
         "fp8", dest="fp8"),
    Flag("--fp8-recipe", HONOURED,
         "delayed, tensorwise or blockwise (the report's: 1x128 activation tiles, 128x128 weight blocks) through "
         f"Megatron-Core's get_fp8_recipe; mxfp8 and custom are refused, and so is a recipe without --fp8-format "
         f"or --fp8-emulation ({_FP8_RULES})", "fp8"),
    *_family(("--fp8-margin", "--fp8-amax-history-len", "--fp8-amax-compute-algo"), HONOURED,
             "Megatron-Core's TEDelayedScaling (--fp8-recipe delayed) on our Transformer Engine layers", "fp8"),
    Flag("--no-fp8-wgrad", HONOURED,
         "Megatron-Core's TEDelayedScaling keeps Wgrad in BF16 (delayed recipe); refused with --fp8-emulation, "
         f"which runs Wgrad in FP8 as the report does ({_FP8_RULES})", "fp8", dest="fp8_wgrad"),
    Flag("--fp8-interval", NO_EFFECT,
         "deprecated in Megatron-Core and ignored by Transformer Engine >= 1.8", "fp8"),
    Flag("--fp8-output-proj", REFUSED,
         "runs the output head in FP8 (Megatron-Core: mxfp8 only); DeepSeek-V3 keeps the head in BF16 (report "
         "sec. 3.3.1). Drop it", "fp8"),
    Flag("--fp8-quantizer-factory", REFUSED,
         "belongs to --fp8-recipe custom, which is not offered with our specs; use delayed, tensorwise or "
         "blockwise and drop it", "fp8", example=("pkg.quantizer_factory",)),
    *_family(("--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "--num-layers-at-end-in-bf16"),
             HONOURED,
             "Megatron-Core's TransformerBlock leaves those decoder layers out of the FP8 context (with "
             f"--fp8-format, not with the delayed recipe: {_FP8_RULES})", "fp8"),
    Flag("--fp8-param-gather", HONOURED,
         "Transformer Engine FP8 parameters with Megatron-Core's distributed optimizer (kept); refused with "
         f"--fp8-emulation ({_FP8_RULES})", "fp8"),
]

_ATTN_OFFLOAD = {"core_attn", "attn_proj", "qkv_linear"}

_OTHER = [
    Flag("--transformer-impl", HONOURED,
         "local or transformer_engine: the layer classes of our spec (model/backends.py); "
         "inference_optimized is refused", "backend",
         refuse_when=lambda a, f, v, d: v not in ("local", "transformer_engine"),
         error="our layer spec builds local or Transformer Engine layers; give local or transformer_engine",
         example=("inference_optimized",)),
    Flag("--offload-modules", HONOURED,
         "Megatron's fine-grained offloading of attn_norm, mlp_norm (TransformerLayer), expert_fc1, moe_act, "
         "fused_group_mlp (experts); core_attn, attn_proj and qkv_linear live in Megatron's attention and "
         "are refused", "offload",
         refuse_when=lambda a, f, v, d: bool(set(v or ()) & _ATTN_OFFLOAD),
         error="core_attn, attn_proj and qkv_linear are offloaded by hooks inside Megatron's attention "
               "classes, which our MLA does not have; drop them from --offload-modules",
         example=("core_attn",)),
    Flag("--cuda-graph-impl", REFUSED,
         "CUDA graphs are not supported with our router yet (its token counts and balance-loss logging run "
         "in Python at each step); drop it", "graphs", example=("local",)),
    *_family(("--enable-cuda-graph", "--external-cuda-graph"), REFUSED,
             "deprecated spellings of --cuda-graph-impl; CUDA graphs are not supported with our router yet. "
             "Drop it", "graphs"),
    Flag("--cuda-graph-modules", REFUSED,
         "only used with --cuda-graph-impl, which is not supported with our router yet; drop it", "graphs",
         example=("attn",)),
    Flag("--cuda-graph-scope", REFUSED,
         "only used with --cuda-graph-impl, which is not supported with our router yet; drop it", "graphs",
         dest="cuda_graph_scope_deprecated", example=("attn",)),
    Flag("--heterogeneous-layers-config-path", REFUSED,
         "heterogeneous layers are built from Megatron's own layer specs; megatron-dsv3 builds DeepSeek-V3 "
         "layers. Drop it", "backend", example=("/tmp/layers.json",)),
    Flag("--heterogeneous-layers-config-encoded-json", REFUSED,
         "heterogeneous layers are built from Megatron's own layer specs; megatron-dsv3 builds DeepSeek-V3 "
         "layers. Drop it", "backend", example=("{}",)),
    *_family(("--hybrid-layer-pattern", "--hybrid-override-pattern"), REFUSED,
             "hybrid (Mamba) layer patterns build Megatron's HybridModel; megatron-dsv3 builds GPTModel with "
             "DeepSeek-V3 layers. Drop it", "backend", example=("M*",)),
    Flag("--is-hybrid-model", REFUSED,
         "megatron-dsv3 builds GPTModel with DeepSeek-V3 layers, not a hybrid model; drop it", "backend"),
]

#: The audited flags written here (the mapping table's rows are added by :func:`audit`).
AUDIT_EXPLICIT: tuple[Flag, ...] = tuple(_ATTENTION + _ROPE + _NORM + _MLP + _MOE + _MTP + _RECOMPUTE
                                         + _FUSION + _FP8 + _OTHER)

_AREA_OF_ROW = {"rotary": "rope", "mscale": "rope", "yarn": "rope", "rope": "rope", "moe": "moe",
                "num_experts": "moe", "n_shared": "moe", "first_k": "moe", "norm_topk": "moe", "mtp": "mtp",
                "layernorm": "norm", "normalization": "norm", "qk_": "attention", "q_lora": "attention",
                "kv_": "attention", "v_head": "attention", "multi_latent": "attention", "swiglu": "mlp",
                "ffn": "mlp", "add_bias": "mlp", "position": "rope"}


def _row_area(dest: str) -> str:
    for prefix, area in _AREA_OF_ROW.items():
        if dest.startswith(prefix):
            return area
    return "model"


@functools.lru_cache(maxsize=1)
def _parser_actions() -> dict:
    """{dest: [argparse actions]} of the launcher's parser (Megatron-LM's + ours)."""
    out: dict = {}
    for action in build_parser()._actions:
        out.setdefault(action.dest, []).append(action)
    return out


def megatron_default(dest: str) -> Any:
    """The value Megatron-LM's parser gives ``dest`` when the flag is absent (the first action's)."""
    return _parser_actions()[dest][0].default


def option_of(dest: str) -> str:
    """The command-line spelling of ``dest`` ('layernorm_epsilon' -> '--norm-epsilon')."""
    return _parser_actions()[dest][0].option_strings[0]


@functools.lru_cache(maxsize=1)
def audit() -> tuple[Flag, ...]:
    """The whole audit: :data:`AUDIT_EXPLICIT` plus the mapping table's flags (honoured / fixed)."""
    explicit = {f.dest for f in AUDIT_EXPLICIT}
    rows = []
    for row in ROWS:
        if row.flag is None or row.flag in explicit:
            continue
        if row.fixed:
            note = f"config/mapping.py: {row.why}; refused unless {row.as_flag(row.of({}))!r}"
            status = FIXED
        elif row.field is not None:
            note = f"sets the DSv3 field {row.field} (config/mapping.py); our modules read it"
            status = HONOURED
        else:  # a Megatron value derived from the model; a given one must be handled explicitly above
            raise AssertionError(f"mapping row {row.flag} has no DSv3 field: audit it in AUDIT_EXPLICIT")
        rows.append(Flag(option_of(row.flag), status, note, _row_area(row.flag), dest=row.flag))
    return AUDIT_EXPLICIT + tuple(rows)


# ----------------------------------------------------------------------------------------------
# The launch check
# ----------------------------------------------------------------------------------------------
def _shown(flag: Flag, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return flag.option
    if isinstance(value, (list, tuple)):
        return f"{flag.option} {' '.join(map(str, value))}"
    return f"{flag.option} {getattr(value, 'name', value)}"


def refusals(args: argparse.Namespace, given: set[str], fields: Mapping) -> list[str]:
    """One message per flag the user gave with a value our modules do not honour."""
    out = []
    for flag in AUDIT_EXPLICIT:
        if flag.dest in given and flag.refuses(args, fields, megatron_default(flag.dest)):
            out.append(f"{_shown(flag, getattr(args, flag.dest, None))}: {flag.error or flag.note}")
    return out


def check_flags(args: argparse.Namespace, given: set[str], fields: Mapping) -> None:
    """Refuse, before any process group exists, every given flag our modules would not honour."""
    found = refusals(args, given, fields)
    if len(found) == 1:
        raise LaunchError(found[0])
    if found:
        raise LaunchError("these flags act on modules megatron-dsv3 replaced and are not supported:\n  "
                          + "\n  ".join(found))


# ----------------------------------------------------------------------------------------------
# The README table
# ----------------------------------------------------------------------------------------------
_AREAS = ("attention", "rope", "norm", "mlp", "moe", "mtp", "recompute", "fusion", "fp8", "offload", "graphs",
          "backend", "model")


def readme_table() -> str:
    """Markdown: | flag | status | note |, grouped by area."""
    lines = ["| flag | status | note |", "|---|---|---|"]
    for area in _AREAS:
        for flag in audit():
            if flag.area == area:
                lines.append(f"| `{flag.option}` | {flag.status} | {flag.note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def readme_section() -> str:
    counts = {s: sum(f.status == s for f in audit()) for s in (HONOURED, REFUSED, NO_EFFECT, FIXED)}
    return (
        "### Megatron-LM flags on the modules we replaced\n\n"
        "Every Megatron-LM flag that acts on attention, RoPE, norms, the FFN, MoE routing / experts / "
        "dispatch, MTP, recomputation or fusions, and what a launch does with it "
        f"({len(audit())} flags: {counts[HONOURED]} honoured, {counts[REFUSED]} refused, "
        f"{counts[NO_EFFECT]} without effect, {counts[FIXED]} fixed by the architecture). A refused flag "
        "given with a value that asks for something our modules do not do stops the launch before any "
        "process group exists, naming the flag and what to do; the table is "
        "`megatron_dsv3/training/flag_audit.py` (`python -m megatron_dsv3.training.flag_audit` prints "
        "it).\n\n" + readme_table())


if __name__ == "__main__":
    print(readme_section(), end="")
