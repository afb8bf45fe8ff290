"""FLOP count of a DeepSeek-V3 model built by :func:`megatron_dsv3.spec.build_model`, plus the
per-GPU peak throughputs needed for TFLOP/s-per-device and MFU logging.

What is counted: the matrix multiplications only, 2*m*n*k FLOPs for an [m, k] x [k, n] product
(one multiply + one add per multiply-accumulate). Element-wise work (RMSNorm, RoPE, SiLU and the
SwiGLU product, softmax, the attention scale, the residual adds, the router's sigmoid / top-k /
normalisation, the combine weights, the loss) and the embedding lookup are NOT counted: they are
O(s*h) and a fraction of a percent of the matmuls at DSv3 sizes.

Legend (DSv3Config field in brackets):

    s   sequence length                      h   hidden size [hidden_size]
    H   attention heads [num_attention_heads]
    dn, dr, dv   per-head q/k no-RoPE, RoPE, value dims [qk_nope_head_dim, qk_rope_head_dim, v_head_dim]
    dq = dn + dr   per-head query/key dim
    rq  q low-rank dim [q_lora_rank], None = plain q projection
    rkv KV latent dim [kv_lora_rank]
    F   dense SwiGLU width [ffn_hidden_size]      I   expert width [moe_intermediate_size]
    E   routed experts [n_routed_experts]         K   experts per token [num_experts_per_tok]
    S   shared experts [n_shared_experts] (fused into one SwiGLU of width S*I)
    V   vocabulary [vocab_size]
    L   decoder layers [num_layers], Lm MoE ones [moe_layer_numbers], Ld = L - Lm dense ones
    D   MTP depth [mtp_num_layers]
    P   attended (query, key) pairs per head: s(s+1)/2 when causal, s^2 when not

Forward FLOPs of ONE sequence, per part (the keys of :func:`model_flops`):

    attn_q          L * 2s(h*rq + rq*H*dq)       (q_down, q_up);  L * 2s*h*H*dq when rq is None
    attn_kv         L * 2s(h*(rkv+dr) + rkv*H*(dn+dv))   (kv_down -> [c_kv | k_pe], kv_up)
    attn_out        L * 2s*H*dv*h                (o_proj)
    attn_scores     L * 2*H*dq*P                 (Q K^T)
    attn_values     L * 2*H*dv*P                 (softmax(.) V)
    dense_mlp       Ld * 2s*3*h*F                (gate, up, down)
    router          Lm * 2s*h*E                  (gate logits; every token scores every expert)
    routed_experts  Lm * 2s*K*3*h*I              (exactly K experts per token: no token dropping)
    shared_experts  Lm * 2s*3*h*(S*I)
    head            2s*h*V                       (output layer, not tied)
    mtp_eh_proj     D * 2s*(2h)*h                (the [emb ; h] -> h projection)
    mtp_layer       D * one MoE decoder layer    (all attention + MoE terms above, for one layer)
    mtp_head        D * 2s*h*V                   (the shared output head on each depth's states)
    total           the sum of all the above

The MTP modules run over all s positions, as Megatron-Core's MTP block does (it rolls the ids
left and keeps the length; the last k positions of depth k are only masked out of the loss).

Training convention (:func:`train_flops_per_iteration`): forward + backward = 3 x forward, i.e.
the backward of every matmul costs two matmuls of the same size (input gradient + weight
gradient). This is the useful work of the step; recomputation (activation checkpointing, the
QK^T recompute inside a fused attention backward) is NOT counted, so MFU stays comparable
across recompute settings. MTP is part of the training objective and is counted.

Attention is counted causally by default (only the s(s+1)/2 attended pairs: the work a causal
flash-attention kernel actually has to do). ``causal=False`` gives the full s^2 count, which is
what ``torch.utils.flop_counter.FlopCounterMode`` reports (it ignores ``is_causal``; see
``tests/test_flops.py``).
"""
from __future__ import annotations

import re
from typing import Optional

__all__ = [
    "PARTS", "model_flops", "train_flops_per_iteration", "PEAK_TFLOPS", "peak_tflops",
    "tflops_per_device", "mfu",
]

#: The keys of :func:`model_flops`, in order; "total" is the sum of the others.
PARTS = ("attn_q", "attn_kv", "attn_out", "attn_scores", "attn_values", "dense_mlp", "router",
         "routed_experts", "shared_experts", "head", "mtp_eh_proj", "mtp_layer", "mtp_head", "total")


def _attention(c, s: int, pairs: int) -> dict:
    """Forward FLOPs of one MLA layer over one sequence of length s."""
    h, H = c.hidden_size, c.num_attention_heads
    dn, dr, dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    dq = dn + dr
    rkv = c.kv_lora_rank
    if c.q_lora_rank is None:
        q = 2 * s * h * H * dq
    else:
        q = 2 * s * (h * c.q_lora_rank + c.q_lora_rank * H * dq)
    return {
        "attn_q": q,
        "attn_kv": 2 * s * (h * (rkv + dr) + rkv * H * (dn + dv)),
        "attn_out": 2 * s * H * dv * h,
        "attn_scores": 2 * H * dq * pairs,
        "attn_values": 2 * H * dv * pairs,
    }


def _moe(c, s: int) -> dict:
    """Forward FLOPs of one DeepSeekMoE FFN over one sequence of length s."""
    h, I = c.hidden_size, c.moe_intermediate_size
    return {
        "router": 2 * s * h * c.n_routed_experts,
        "routed_experts": 2 * s * c.num_experts_per_tok * 3 * h * I,
        "shared_experts": 2 * s * 3 * h * (c.n_shared_experts or 0) * I,
    }


def model_flops(config, seq_len: int, *, causal: bool = True) -> dict:
    """Forward matmul FLOPs of ONE sequence of ``seq_len`` tokens, by part (see the module doc).

    Args:
        config: a :class:`~megatron_dsv3.config.DSv3Config` (the whole model, whatever the
            parallel layout: divide by the devices yourself).
        seq_len: tokens per sequence.
        causal: count only the s(s+1)/2 attended (query, key) pairs per head (True) or all s^2.

    Returns:
        {part: int} with the keys of :data:`PARTS`; ``total`` is the sum of the other values.
    """
    s = int(seq_len)
    if s != seq_len or s < 1:
        raise ValueError(f"model_flops: seq_len must be a positive integer, got {seq_len!r}")
    c = config
    pairs = s * (s + 1) // 2 if causal else s * s
    L, D = c.num_layers, c.mtp_num_layers or 0
    Lm = len(c.moe_layer_numbers)
    Ld = L - Lm
    h = c.hidden_size

    out = dict.fromkeys(PARTS, 0)
    for k, v in _attention(c, s, pairs).items():
        out[k] += L * v
    out["dense_mlp"] = Ld * 2 * s * 3 * h * c.ffn_hidden_size if Ld else 0
    if Lm:
        for k, v in _moe(c, s).items():
            out[k] += Lm * v
    out["head"] = 2 * s * h * c.vocab_size
    if D:
        mtp_layer = sum(_attention(c, s, pairs).values()) + sum(_moe(c, s).values())
        out["mtp_eh_proj"] = D * 2 * s * (2 * h) * h
        out["mtp_layer"] = D * mtp_layer
        out["mtp_head"] = D * 2 * s * h * c.vocab_size
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


def train_flops_per_iteration(config, seq_len: int, global_batch_size: int, *,
                              causal: bool = True) -> float:
    """Useful FLOPs of one training iteration: 3 x forward (forward + input grad + weight grad)
    x ``global_batch_size`` sequences. Recomputation is not counted (see the module doc)."""
    if int(global_batch_size) != global_batch_size or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    return float(3 * model_flops(config, seq_len, causal=causal)["total"] * int(global_batch_size))


# ------------------------------------------------------------------------------------------------
# Peak throughput per GPU, dense (no 2:4 sparsity), in TFLOP/s.
#
# Hopper SXM (H100 SXM5, H800 SXM5, H200 SXM): 132 SMs x 4096 dense BF16 FLOP/clk/SM x 1.830 GHz
#   boost = 989.4 TFLOP/s BF16, twice that (1978.9) for FP8 -- NVIDIA H100 Tensor Core GPU
#   Architecture whitepaper (table "NVIDIA H100 SXM5"); the H100 / H200 datasheets give 1,979 BF16
#   and 3,958 FP8 "with sparsity", i.e. the same dense numbers. The H800 is the export H100 SXM
#   (same SMs and clocks, reduced NVLink / FP64); the H200 is the same GH100 die with HBM3e.
# H100 PCIe: 756.5 BF16, 1513 FP8 dense (H100 datasheet: 1,513 / 3,026 "with sparsity").
# A100 (SXM4 and PCIe, 40 and 80 GB): 312 TFLOP/s BF16 dense (A100 datasheet: 312, 624 with
#   sparsity); no FP8 tensor cores. A800 = export A100, same 312.
# FP16 tensor-core peaks equal BF16 on these parts, so "fp16" reads the "bf16" column.
# Anything else (H100 NVL, H200 NVL, H800 PCIe, GH200, Blackwell, ...) is not in the table:
# peak_tflops() answers None rather than guess.
# ------------------------------------------------------------------------------------------------
PEAK_TFLOPS: dict[str, dict[str, Optional[float]]] = {
    "H100 SXM": {"bf16": 989.4, "fp8": 1978.9},
    "H800 SXM": {"bf16": 989.4, "fp8": 1978.9},
    "H200 SXM": {"bf16": 989.4, "fp8": 1978.9},
    "H100 PCIe": {"bf16": 756.5, "fp8": 1513.0},
    "A100": {"bf16": 312.0, "fp8": None},
    "A800": {"bf16": 312.0, "fp8": None},
}

# torch.cuda.get_device_name() strings -> table entry. Examples: "NVIDIA H800", "NVIDIA H100 80GB
# HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe".
# The first matching pattern wins; a None entry means "known, but not in the table".
_DEVICE_PATTERNS: list[tuple[str, Optional[str]]] = [
    (r"\b(H100|H200|H800)\b.*\bNVL\b", None),
    (r"\bH800\b.*\bPCIE\b", None),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),          # the remaining H100s are SXM5 ("H100 80GB HBM3")
    (r"\bH800\b", "H800 SXM"),
    (r"\bH200\b", "H200 SXM"),          # "GH200" does not match (\b)
    (r"\bA100\b", "A100"),
    (r"\bA800\b", "A800"),
]

_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
           "fp16": "bf16", "float16": "bf16", "torch.float16": "bf16",
           "fp8": "fp8", "float8": "fp8", "e4m3": "fp8", "hybrid": "fp8"}


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """Dense peak TFLOP/s of one GPU for ``dtype`` ("bf16"/"bfloat16"/"fp16" or "fp8").

    ``device_name`` is what ``torch.cuda.get_device_name()`` returns. None when the device (or the
    dtype on that device, e.g. FP8 on an A100) is not in :data:`PEAK_TFLOPS`: never a guess.
    """
    key = _DTYPES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"peak_tflops: unknown dtype {dtype!r}; use 'bf16' or 'fp8'")
    name = str(device_name).upper()
    for pattern, entry in _DEVICE_PATTERNS:
        if re.search(pattern, name):
            return None if entry is None else PEAK_TFLOPS[entry][key]
    return None


def tflops_per_device(flops_per_iter: float, iter_seconds: float, world_size: int) -> float:
    """Achieved TFLOP/s per device: flops_per_iter / iter_seconds / world_size / 1e12."""
    if iter_seconds <= 0 or world_size < 1:
        raise ValueError(f"tflops_per_device: need iter_seconds > 0 and world_size >= 1, got "
                         f"{iter_seconds!r}, {world_size!r}")
    return flops_per_iter / iter_seconds / world_size / 1e12


def mfu(flops_per_iter: float, iter_seconds: float, world_size: int,
        peak_tflops: Optional[float]) -> float:
    """Model FLOPs utilisation, a fraction in [0, 1]: achieved TFLOP/s per device / peak.

    ``peak_tflops`` is per device (see :func:`peak_tflops`); None or <= 0 is an error.
    """
    if peak_tflops is None or peak_tflops <= 0:
        raise ValueError(f"mfu: the device's peak TFLOP/s is unknown ({peak_tflops!r}); pass it "
                         f"explicitly or skip MFU")
    return tflops_per_device(flops_per_iter, iter_seconds, world_size) / peak_tflops
