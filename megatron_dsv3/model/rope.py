"""Decoupled RoPE with YaRN, as in DeepSeek-V3 (report sec. 2.1.1 and 4.3).

Pure tensor maths, no parallelism. The rotation acts on INTERLEAVED pairs (2i, 2i+1) of the
``qk_rope_head_dim`` channels. :func:`apply_rope` returns the rotated pairs in "half" layout
(all first members, then all second members); queries and keys go through the same function, so
their dot product equals the interleaved rotation's.
"""
from __future__ import annotations

import math

import torch


def yarn_mscale(factor: float, mscale: float) -> float:
    """m = 0.1 * mscale * ln(factor) + 1 for factor > 1, else 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def inverse_frequencies(dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """fp64 inverse frequencies [dim/2] with the YaRN ramp between beta_fast and beta_slow."""
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if rope_scaling is None or rope_scaling["factor"] <= 1:
        return inv
    factor = rope_scaling["factor"]
    orig = rope_scaling["original_max_position_embeddings"]

    def cdim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(cdim(rope_scaling["beta_fast"])), 0)
    high = min(math.ceil(cdim(rope_scaling["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inv / factor * ramp + inv * (1 - ramp)


def cos_sin(seq_len: int, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype):
    """cos, sin of shape [seq_len, dim/2] for positions 0..seq_len-1."""
    pos = torch.arange(seq_len, dtype=torch.float64, device=inv_freq.device)
    angles = torch.outer(pos, inv_freq.to(torch.float64))
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [s, b, h, d] by cos/sin [s, d/2]; output in half layout."""
    x_pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    cos = cos[:, None, None, :]
    sin = sin[:, None, None, :]
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
