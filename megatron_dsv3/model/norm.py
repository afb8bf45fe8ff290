"""RMSNorm as DeepSeek-V3 defines it: ``w * x / sqrt(mean(x^2) + eps)``, gain applied directly.

Computed in fp32 and cast back to the input dtype before the gain, like the reference. Unlike
Megatron-Core's local ``WrappedTorchNorm`` it works under sequence parallelism: its gain is marked
``sequence_parallel`` so Megatron's finalize_model_grads sums its gradient over the TP group.

In fp32 (the CPU) it is one autograd node with its backward written out (xhat = x * rstd):
``dx = rstd * (g w - xhat * mean(g w xhat))``, ``dw = sum over tokens of g xhat`` - about half the
operators of the composite's autograd graph, which dominate at small widths (CPU: 181 vs 230 us per
forward + backward at [512, 64]). The forward is the same operations in the same order (bit for bit);
the gradients agree within fp32 rounding (tests/test_gemm.py::test_rmsnorm_function).
"""
from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """Args: config (sets dtype and sequence_parallel), hidden_size, eps."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return _RMSNormFp32.apply(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class _RMSNormFp32(torch.autograd.Function):
    """``w * x * rsqrt(mean(x^2) + eps)`` for fp32 ``x`` and ``w``, backward written out."""

    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return w * xhat

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        gw = g * w
        dx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)) * rstd if ctx.needs_input_grad[0] else None
        dw = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw, None
