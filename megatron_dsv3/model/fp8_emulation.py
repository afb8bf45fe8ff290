"""FP8 emulation of DeepSeek-V3's training recipe (report sec. 3.3, Figure 6) on Megatron-Core's local
linear layers: any device, the CPU included (``--fp8-emulation``; Python: :func:`enable`).

Every GEMM of a linear layer takes FP8 (e4m3) inputs and accumulates in fp32, in the three places of
Figure 6, with the report's fine-grained scaling (one fp32 scale per tile / block, ``s = amax / 448``):

    y  [M, N] = x  [M, K] @ W^T      Fprop   x per 1x128 tile along K, W per 128x128 block
    dx [M, K] = dy [M, N] @ W        Dgrad   dy per 1x128 tile along N, the same W blocks
    dW [N, K] = dy^T [N, M] @ x      Wgrad   dy and x per 128x1 tile along M (the tokens)

Accumulation: for each 128-wide slice of the reduction dimension the FP8 products are summed in fp32
and multiplied by the two tiles' scales, and those partial sums are added in fp32 (the report's
"promotion to fp32 every 128 elements"). The layer caches its input for backward in FP8 (the 1x128
quantised x); Wgrad re-tiles that cached x to 128x1 tiles (dequantise, quantise again), as the report
converts cached activations for the transposed use. Outputs are in the training dtype.

Which layers (the map of the Transformer Engine build, :mod:`.backends`): the MLA projections (q / kv
down and up, output), the dense SwiGLU, the routed experts and the shared experts run through the FP8
GEMMs; the embedding, the output head, the MoE gate (router), every RMSNorm, the attention core and the
MTP module's ``eh_proj`` stay in the training precision (report sec. 3.3.1; the released FP8
checkpoint also stores ``eh_proj`` in BF16).

What it does NOT model: the limited accumulation precision of Hopper's tensor cores inside a
128-element interval (the emulation accumulates in fp32 throughout; the report's promotion exists to
bound exactly that error), the E5M6 format the report uses for a few cached activations (e4m3 here),
FP8 all-gathers of parameters, the power-of-two scales some kernels use, and speed (it is slower than
the unquantised layer: the quantisation is extra work). The token dispatch in FP8 is the node-limited
dispatcher's ``--moe-dispatch-fp8``, separate from this module.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Tuple

import torch
import torch.nn.functional as F

from ..parallel.collectives import gather_first_dim, reduce_scatter_first_dim

E4M3 = torch.float8_e4m3fn
#: Largest finite e4m3 value (448).
E4M3_MAX = float(torch.finfo(E4M3).max)
#: The report's tile / block edge.
TILE = 128


# ----------------------------------------------------------------------------------------------
# Quantisation
# ----------------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, block: Tuple[int, int], dtype: torch.dtype = E4M3):
    """Quantise a 2-D tensor per ``block`` (rows, cols) tile: ``(q, scale)``.

    ``scale[i, j] = amax(tile ij) / 448`` in fp32 (1 for an all-zero tile), ``q = fp8(x / scale)``
    (round to nearest even, clamped to +-448); edge tiles are the partial remainders. ``q`` has the
    shape of ``x``; ``scale`` is [ceil(R / rows), ceil(C / cols)]. ``x ~= q * scale`` tile by tile.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D tensor, got shape {tuple(x.shape)}")
    R, C = x.shape
    br, bc = block
    nr, nc = -(-R // br), -(-C // bc)
    fmax = float(torch.finfo(dtype).max)
    xf = x.detach().float()
    padded = F.pad(xf, (0, nc * bc - C, 0, nr * br - R))
    tiles = padded.view(nr, br, nc, bc)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-fmax, fmax).to(dtype)
    return q.view(nr * br, nc * bc)[:R, :C], scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """fp32 ``q * scale`` with each scale broadcast over its tile."""
    R, C = q.shape
    full = scale.repeat_interleave(block[0], 0)[:R].repeat_interleave(block[1], 1)[:, :C]
    return q.float() * full


def _row_scales(scale: torch.Tensor, rows_per_block: int, n_rows: int) -> torch.Tensor:
    """[row blocks, k blocks] -> [n_rows, k blocks] (each row's scale per 128-slice of K)."""
    return scale.repeat_interleave(rows_per_block, 0)[:n_rows]


def block_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, a_rows: int,
               b_q: torch.Tensor, b_scale: torch.Tensor, b_rows: int) -> torch.Tensor:
    """``A @ B^T`` in fp32 for FP8 operands tiled along K (the reduction) in slices of 128.

    a_q [M, K] with scales [ceil(M / a_rows), ceil(K / 128)] (a_rows = 1: 1x128 tiles, 128: blocks);
    b_q [N, K] likewise. Per slice k: P_k = a_q[:, k] @ b_q[:, k]^T (exact products, fp32 sums),
    then out = sum_k P_k * a_scale[m, k] * b_scale[n, k] in fp32.
    """
    M, K = a_q.shape
    N = b_q.shape[0]
    nk = -(-K // TILE)
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    pad = nk * TILE - K
    a = F.pad(a_q.float(), (0, pad)).view(M, nk, TILE).transpose(0, 1)          # [nk, M, 128]
    b = F.pad(b_q.float(), (0, pad)).view(N, nk, TILE).permute(1, 2, 0)         # [nk, 128, N]
    partial_sums = torch.bmm(a, b)                                               # [nk, M, N] fp32
    sa = _row_scales(a_scale, a_rows, M).t()[:, :, None]                         # [nk, M, 1]
    sb = _row_scales(b_scale, b_rows, N).t()[:, None, :]                         # [nk, 1, N]
    return (partial_sums * sa * sb).sum(dim=0)


def fp8_matmul_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Fprop of the emulation for a 2-D x [M, K] and w [N, K] (tests, benchmarks)."""
    xq, xs = quantize(x, (1, TILE))
    wq, ws = quantize(w, (TILE, TILE))
    return block_gemm(xq, xs, 1, wq, ws, TILE)


# ----------------------------------------------------------------------------------------------
# The linear: Fprop, Dgrad and Wgrad in FP8, tensor parallelism as Megatron-Core's local linear
# ----------------------------------------------------------------------------------------------
class FP8Linear(torch.autograd.Function):
    """``y = gather(x) @ W^T`` with the three GEMMs of Figure 6 in emulated FP8.

    ``sequence_parallel``: x is this rank's sequence shard, all-gathered over ``tp_group`` before the
    GEMM (dx reduce-scattered back); ``allreduce_dgrad``: dx is summed over ``tp_group``.
    """

    @staticmethod
    def forward(ctx, x, weight, sequence_parallel: bool, allreduce_dgrad: bool, tp_group):
        total = gather_first_dim(x, tp_group) if sequence_parallel else x
        K, N = weight.shape[1], weight.shape[0]
        x2 = total.reshape(-1, K)
        xq, xs = quantize(x2, (1, TILE))
        wq, ws = quantize(weight, (TILE, TILE))
        y = block_gemm(xq, xs, 1, wq, ws, TILE)
        ctx.save_for_backward(xq, xs, wq, ws)        # the activation is cached in FP8
        ctx.shape, ctx.x_dtype, ctx.w_dtype = total.shape, x.dtype, weight.dtype
        ctx.sequence_parallel, ctx.allreduce_dgrad, ctx.tp_group = sequence_parallel, allreduce_dgrad, tp_group
        return y.to(x.dtype).view(*total.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        N, K = wq.shape
        dy2 = dy.reshape(-1, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # Dgrad: dx = dy @ W; reduction over N: dy in 1x128 tiles along N, W^T's blocks = W's
            dyq, dys = quantize(dy2, (1, TILE))
            dx = block_gemm(dyq, dys, 1, wq.t(), ws.t(), TILE).to(ctx.x_dtype).view(ctx.shape)
            if ctx.sequence_parallel:
                dx = reduce_scatter_first_dim(dx, ctx.tp_group)
            elif ctx.allreduce_dgrad:
                torch.distributed.all_reduce(dx, group=ctx.tp_group)
        if ctx.needs_input_grad[1]:
            # Wgrad: dW = dy^T @ x; reduction over the tokens M: both in 128x1 tiles along M
            dyq_t, dys_t = quantize(dy2, (TILE, 1))                 # scales [M / 128, N]
            x_cached = dequantize(xq, xs, (1, TILE))
            xq_t, xs_t = quantize(x_cached, (TILE, 1))              # scales [M / 128, K]
            dw = block_gemm(dyq_t.t(), dys_t.t(), 1, xq_t.t(), xs_t.t(), 1).to(ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, *, sequence_parallel: bool = False,
               allreduce_dgrad: bool = False, tp_group=None) -> torch.Tensor:
    return FP8Linear.apply(x, weight, sequence_parallel, allreduce_dgrad, tp_group)


def _fp8_forward_impl(layer, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                      gtp_remat_size=1, **rest):
    """``_forward_impl`` of Megatron-Core's local parallel linears, through :class:`FP8Linear`."""
    if gradient_accumulation_fusion or grad_output_buffer is not None or (gtp_remat_size or 1) > 1 or rest:
        raise NotImplementedError(
            "FP8 emulation: gradient-accumulation fusion, deferred embedding wgrad and GTP are not "
            "supported by the emulated linears (give --no-gradient-accumulation-fusion)")
    sp = bool(sequence_parallel) and tp_group is not None and tp_group.size() > 1
    ar = bool(allreduce_dgrad) and tp_group is not None and tp_group.size() > 1
    y = fp8_linear(input, weight, sequence_parallel=sp, allreduce_dgrad=ar, tp_group=tp_group)
    return y + bias if bias is not None else y


def _column_row_classes():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    class FP8ColumnParallelLinear(ColumnParallelLinear):
        """Megatron-Core's ColumnParallelLinear whose GEMMs run in emulated FP8."""

        def _forward_impl(self, input, weight, *args, **kwargs):
            return _fp8_forward_impl(self, input, weight, *args, **kwargs)

    class FP8RowParallelLinear(RowParallelLinear):
        """Megatron-Core's RowParallelLinear whose GEMMs run in emulated FP8."""

        def _forward_impl(self, input, weight, *args, **kwargs):
            return _fp8_forward_impl(self, input, weight, *args, **kwargs)

    return FP8ColumnParallelLinear, FP8RowParallelLinear


FP8ColumnParallelLinear, FP8RowParallelLinear = _column_row_classes()


def _duplicated_class():
    from .mla import DuplicatedLinear

    class FP8DuplicatedLinear(DuplicatedLinear):
        """Our replicated down projection (MLA q / kv down) with its GEMMs in emulated FP8."""

        def forward(self, x: torch.Tensor):
            return fp8_linear(x, self.weight), None

    return FP8DuplicatedLinear


FP8DuplicatedLinear = _duplicated_class()

#: The layer classes the emulation swaps in, and what stays in the training precision.
FP8_LAYERS = ("MLA q_down / q_up / q_proj / kv_down / kv_up / o_proj", "dense SwiGLU fc1 / fc2",
              "routed experts fc1 / fc2", "shared experts fc1 / fc2", "MTP depth decoder layer (same map)")
HIGH_PRECISION = ("embedding", "output head", "MoE gate (router)", "RMSNorms", "attention core (softmax(QK^T)V)",
                  "MTP eh_proj")


# ----------------------------------------------------------------------------------------------
# The backend and the switch
# ----------------------------------------------------------------------------------------------
def enable(config):
    """A copy of ``config`` (a DSv3Config) with ``fp8_emulation=True``, validated like the field is
    (``transformer_impl='local'``, no gradient-accumulation fusion). Same as ``--fp8-emulation``."""
    return dataclasses.replace(config, fp8_emulation=True)


def enabled(config) -> bool:
    return bool(getattr(config, "fp8_emulation", False))


def fp8_emulation_backend(config):
    """The local backend with the FP8 GEMM layers of the Transformer Engine map (see the module doc)."""
    from .backends import Backend, local_backend
    from .mla import DuplicatedLinear

    if config.transformer_impl != "local":
        raise ValueError("FP8 emulation: transformer_impl must be 'local' (got "
                         f"{config.transformer_impl!r}); use --transformer-impl local")
    from megatron.core.transformer.moe.experts import SequentialMLP

    base = local_backend(config)
    # Megatron-Core's SequentialMLP (one linear pair per expert, each through the FP8 GEMMs); the local
    # backend's grouped-matmul experts would bypass the linear classes
    keywords = dict(base.experts.keywords)
    keywords["submodules"] = dataclasses.replace(keywords["submodules"], linear_fc1=FP8ColumnParallelLinear,
                                                 linear_fc2=FP8RowParallelLinear)
    experts = partial(SequentialMLP, **keywords)
    return Backend(column=FP8ColumnParallelLinear, row=FP8RowParallelLinear, duplicated=FP8DuplicatedLinear,
                   norm=base.norm, experts=experts, mtp_proj=DuplicatedLinear)


def count_fp8_layers(model: torch.nn.Module) -> dict:
    """{'fp8': n, 'high_precision': n} linear layers of a built model (tests, the benchmark)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from .mla import DuplicatedLinear

    fp8 = (FP8ColumnParallelLinear, FP8RowParallelLinear, FP8DuplicatedLinear)
    out = {"fp8": 0, "high_precision": 0}
    for m in model.modules():
        if isinstance(m, fp8):
            out["fp8"] += 1
        elif isinstance(m, (ColumnParallelLinear, RowParallelLinear, DuplicatedLinear)):
            out["high_precision"] += 1
    return out


__all__ = ["E4M3", "E4M3_MAX", "TILE", "quantize", "dequantize", "block_gemm", "fp8_matmul_reference",
           "FP8Linear", "fp8_linear", "FP8ColumnParallelLinear", "FP8RowParallelLinear", "FP8DuplicatedLinear",
           "enable", "enabled", "fp8_emulation_backend", "count_fp8_layers", "FP8_LAYERS", "HIGH_PRECISION"]
