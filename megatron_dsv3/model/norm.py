"""RMSNorm as DeepSeek-V3 defines it: ``w * x / sqrt(mean(x^2) + eps)``, gain applied directly.

Computed in fp32 and cast back to the input dtype before the gain, like the reference. Unlike
Megatron-Core's local ``WrappedTorchNorm`` it works under sequence parallelism: its gain is marked
``sequence_parallel`` so Megatron's finalize_model_grads sums its gradient over the TP group.
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
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
