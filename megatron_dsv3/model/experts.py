"""Routed experts of the local backend: Megatron-Core's ``SequentialMLP`` (its per-expert parameters,
names, sharding and checkpoint layout, so the HF key table and expert parallelism are unchanged)
computed as grouped matmuls: one autograd node per projection for all local experts
(:func:`megatron_dsv3.model.gemm.grouped_linear`) and one activation and probability weighting for
all tokens, instead of a linear, activation and weighting per expert.

Legend: P = tokens routed to this rank's experts (sorted by expert), h = hidden, I = expert width,
n_e = tokens of expert e (``tokens_per_expert``), W1_e [2I, h] / W2_e [h, I] = expert e's fc1 / fc2.

    y  = x_e @ W1_e^T  for each block e of x [P, h]    (one grouped linear)       [P, 2I]
    a  = silu(y[:, :I]) * y[:, I:] * probs                                        [P, I]
    out = a_e @ W2_e^T                                  (one grouped linear)       [P, h]

The same element-wise maths as SequentialMLP's per-expert loop; with ``MEGATRON_DSV3_CPU_GEMM=blas``
the same matmuls too (tested bit for bit), by default large products run on oneDNN (within fp32
rounding, see gemm.py). The grouped path runs on CPU tensors without FP8 / expert-TP / fused
bias-SwiGLU; otherwise it is SequentialMLP (on GPUs grouped GEMMs come from Transformer Engine's
TEGroupedMLP, ``--moe-grouped-gemm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from .gemm import grouped_linear


class GroupedExperts(SequentialMLP):
    """``SequentialMLP`` with a grouped-matmul forward (see the module doc)."""

    def _grouped(self, x: torch.Tensor) -> bool:
        c = self.config
        expert = self.local_experts[0]
        return (x.device.type == "cpu" and not (c.fp8 or c.fp4) and not c.moe_apply_probs_on_input
                and not c.bias_activation_fusion and not c.use_te_activation_func and c.gated_linear_unit
                and c.activation_func is F.silu and c.activation_func_clamp_value is None
                and not c.glu_linear_offset and expert.linear_fc1.bias is None
                and expert.linear_fc2.bias is None and self.tp_group.size() == 1)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not self._grouped(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        counts = torch.as_tensor(tokens_per_expert).reshape(-1).tolist()
        y = grouped_linear(x, counts, [e.linear_fc1.weight for e in self.local_experts])          # [P, 2I]
        gate, up = torch.chunk(y, 2, dim=-1)
        a = F.silu(gate) * up
        a = (a * permuted_probs.unsqueeze(-1)).to(a.dtype)
        out = grouped_linear(a, counts, [e.linear_fc2.weight for e in self.local_experts])        # [P, h]
        return out, None
