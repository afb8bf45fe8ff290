"""fp32 matrix products on CPU: oneDNN where it beats torch's default BLAS, one fixed rule.

torch's CPU ``mm`` / ``F.linear`` call Intel MKL's sgemm. MKL runs its AVX-512 kernels on Intel CPUs
only; on AMD CPUs it takes its AVX2 path. oneDNN (bundled with torch, ``torch.ops.mkldnn``) picks its
kernels by instruction set. Measured on this project's CI machine (AMD EPYC, Zen 5, AVX-512, one
thread, ``tools/bench_layers.py --gemm``): MKL 85-91 GFLOP/s, oneDNN 175-214 GFLOP/s on
[128..2048] x 512 x 512 products, and about half the time for a linear layer's forward + backward. On
Intel CPUs the two are expected to be close (not measured: no Intel machine here); GPUs never take
this path.

Rule (deterministic: it depends on the shapes only, so a resumed run picks what the first run picked):
a product ``[M, K] x [K, N]`` of float32 CPU tensors runs on oneDNN when ``M * K * N >= MIN_MACS``
(below that the Python autograd function costs more than it saves) and on torch's BLAS otherwise.
``MEGATRON_DSV3_CPU_GEMM`` overrides it: ``auto`` (the rule; default), ``onednn`` (every fp32 CPU
product), ``blas`` (torch's default everywhere, e.g. to compare bit for bit with Megatron-Core's own
layers). The choice is logged once per process.

Numerics: fp32 in and out, accumulation in fp32 in another order than MKL's - results agree within
fp32 rounding (tested against float64 references, tests/test_gemm.py), not bit for bit.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.nn.functional as F

#: below this many multiply-adds a product stays on torch's BLAS (measured break-even ~2-3e6 on one
#: Zen 5 thread: [512, 64] x [64, 64] 0.99x, [512, 96] x [96, 64] 0.90x, [512, 64] x [64, 48] 1.13x)
MIN_MACS = 3_000_000
MODES = ("auto", "onednn", "blas")
ENV = "MEGATRON_DSV3_CPU_GEMM"

_log = logging.getLogger(__name__)
_state = {"mode": None, "logged": False, "why": ""}


def mode() -> str:
    """The mode ``MEGATRON_DSV3_CPU_GEMM`` asks for (read once per process; :func:`set_mode` changes it)."""
    if _state["mode"] is None:
        set_mode(os.environ.get(ENV, "auto"))
    return _state["mode"]


def set_mode(value: str) -> None:
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: choose one of {', '.join(MODES)}")
    if value != "blas" and not onednn_available():
        if value == "onednn":
            raise RuntimeError(f"{ENV}=onednn, but this torch build has no oneDNN (torch.backends.mkldnn); "
                               f"use {ENV}=blas")
        value, why = "blas", f"{ENV}=auto, but this torch build has no oneDNN"
    else:
        why = f"{ENV}={value}"
    _state["mode"], _state["logged"], _state["why"] = value, False, why


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _log_once() -> None:
    if _state["logged"]:
        return
    _state["logged"] = True
    from megatron.core.utils import log_single_rank

    what = {"auto": f"oneDNN for products of >= {MIN_MACS:.0e} multiply-adds, torch's BLAS below",
            "onednn": "oneDNN for every product", "blas": "torch's BLAS (MKL) for every product"}[_state["mode"]]
    log_single_rank(_log, logging.INFO, f"fp32 CPU matmuls: {what} ({_state['why']})")


def _onednn(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an ``[m, k] x [k, n]`` product runs on oneDNN."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    chosen = mode()
    _log_once()
    if chosen == "blas":
        return False
    return chosen == "onednn" or m * k * n >= MIN_MACS


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` when it or its transpose is contiguous, else a contiguous copy: oneDNN takes other strides
    (an expanded incoming gradient, stride 0) to a reference kernel, ~1000x slower."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def _lp(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(_dense(a), _dense(w), bias, "none", [], "")


def _mm_nt(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` for 2-D ``a [M, K]``, ``w [N, K]`` (``w`` may be a transposed view)."""
    if _onednn(a.shape[0], a.shape[1], w.shape[0], a.dtype, a.device):
        return _lp(a, w)
    return a @ w.t()


def _mm_tn(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g.T @ x`` ([N, K], a weight gradient) for ``g [M, N]``, ``x [M, K]``. oneDNN copies a
    transposed first operand into rows, so the smaller of the two goes first: ``(x.T @ g).T`` when
    K < N (the output head: 0.34 instead of 0.68 ms at M 512, K 64, N 768)."""
    if not _onednn(g.shape[1], g.shape[0], x.shape[1], g.dtype, g.device):
        return g.t() @ x
    if x.shape[1] < g.shape[1]:
        return _lp(x.t(), g.t()).t().contiguous()
    return _lp(g.t(), x.t())


class _Linear(torch.autograd.Function):
    """``x @ w.T (+ b)`` for 2-D ``x``, all three products through :func:`_mm_nt` / :func:`_mm_tn`."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _lp(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = _mm_nt(g, w.t()) if ctx.needs_input_grad[0] else None
        gw = _mm_tn(g, x) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the product on oneDNN where the rule says so (torch's ``F.linear`` otherwise)."""
    x2 = x.reshape(-1, x.shape[-1])
    if (x.numel() == 0 or weight.dtype != x.dtype
            or not _onednn(x2.shape[0], x2.shape[1], weight.shape[0], x.dtype, x.device)):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _Linear.apply(x2, weight, bias)     # 2-D in and out: the reshapes stay ordinary autograd views
    else:
        y = _lp(x2, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _GroupedLinear(torch.autograd.Function):
    """Rows of ``x`` in consecutive groups of ``counts[e]`` rows; group e is multiplied by ``w_e.T``."""

    @staticmethod
    def forward(ctx, x, counts, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.counts = counts
        return torch.cat([_mm_nt(xe, we) for xe, we in zip(torch.split(x, counts), weights)])

    @staticmethod
    def backward(ctx, g):
        x, *weights = ctx.saved_tensors
        gs, xs = torch.split(g, ctx.counts), torch.split(x, ctx.counts)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.cat([_mm_nt(ge, we.t()) for ge, we in zip(gs, weights)])
        gws = [(_mm_tn(ge, xe) if ge.shape[0] else torch.zeros_like(we)) if need else None
               for ge, xe, we, need in zip(gs, xs, weights, ctx.needs_input_grad[2:])]
        return (gx, None, *gws)


def _dense_grad(t: torch.Tensor) -> torch.Tensor:
    """torch's grouped-matmul backward needs a dense incoming gradient (a broadcast one fails)."""
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_linear(x: torch.Tensor, counts: Sequence[int], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``cat(x_e @ w_e.T)`` over consecutive row blocks ``x_e`` of ``counts[e]`` rows: the routed experts'
    projections. When the rule puts the largest block on oneDNN: one autograd node whose products each
    take oneDNN or BLAS by the rule; otherwise ``torch._grouped_mm`` over the stacked weights (its loop
    over the groups runs in C++: cheaper for many small products; the same BLAS products as a
    per-expert ``F.linear``)."""
    counts = [int(c) for c in counts]
    if not weights or len(counts) != len(weights) or sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_linear: {len(weights)} weights and row counts {counts} for {x.shape[0]} rows")
    if _onednn(max(counts), x.shape[1], weights[0].shape[0], x.dtype, x.device):
        return _GroupedLinear.apply(x.contiguous(), counts, *weights)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    w = torch.stack(list(weights)).transpose(1, 2)                       # [E, K, N]
    return _dense_grad(torch._grouped_mm(x, w, offs=offs))
