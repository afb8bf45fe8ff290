"""Sequence-parallel collectives along the first dimension, shared by the layers that run their own
GEMMs next to Megatron's (the emulated-FP8 linear, the DualPipe split-backward linear)."""
from __future__ import annotations

import torch

# torch >= 2.12 names them *_single (the *_tensor names warn)
_all_gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
_reduce_scatter = (getattr(torch.distributed, "reduce_scatter_single", None)
                   or torch.distributed.reduce_scatter_tensor)


def gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[s/n, ...] on each of the n ranks of ``group`` -> [s, ...] (rank order)."""
    out = torch.empty((x.shape[0] * group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x.contiguous(), group=group)
    return out


def reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[s, ...] partial sums on each rank -> this rank's [s/n, ...] slice of their sum."""
    out = torch.empty((x.shape[0] // group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, x.contiguous(), group=group)
    return out
