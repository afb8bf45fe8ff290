"""Routed experts of the local backend: Megatron-Core's ``SequentialMLP`` (its per-expert parameters,
names, sharding and checkpoint layout, so the HF key table and expert parallelism are unchanged)
computed as grouped matmuls: one ``torch._grouped_mm`` per projection for all local experts instead
of one matmul, activation and weighting per expert.

Legend: P = tokens routed to this rank's experts (sorted by expert), h = hidden, I = expert width,
E = local experts, n_e = tokens of expert e (``tokens_per_expert``).

    W1 = stack(fc1 weights)            [E, 2I, h]      W2 = stack(fc2 weights)    [E, h, I]
    y  = x_e @ W1[e]^T  for each block e of x [P, h]   (one grouped matmul)       [P, 2I]
    a  = silu(y[:, :I]) * y[:, I:] * probs                                        [P, I]
    out = a_e @ W2[e]^T                                (one grouped matmul)       [P, h]

Identical to SequentialMLP's per-expert loop (the same matmuls, the same element-wise maths;
tested bit for bit). The grouped path runs on CPU tensors without FP8 / expert-TP / fused bias-SwiGLU;
otherwise it is SequentialMLP (on GPUs grouped GEMMs come from Transformer Engine's TEGroupedMLP,
``--moe-grouped-gemm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    """torch's grouped-matmul backward needs a dense incoming gradient (a broadcast one fails)."""
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


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
        counts = torch.as_tensor(tokens_per_expert, dtype=torch.long).reshape(-1)
        offs = counts.cumsum(0).to(torch.int32)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])          # [E, 2I, h]
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])          # [E, h, I]
        y = _contiguous_grad(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs))
        gate, up = torch.chunk(y, 2, dim=-1)
        a = F.silu(gate) * up
        a = (a * permuted_probs.unsqueeze(-1)).to(a.dtype)
        out = _contiguous_grad(torch._grouped_mm(a, w2.transpose(1, 2), offs=offs))
        return out, None
