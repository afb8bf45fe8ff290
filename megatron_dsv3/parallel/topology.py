"""Node topology of the expert-parallel group: which node holds each expert, as the cluster places
ranks (a node holds ``ranks_per_node`` consecutive global ranks: torchrun / Slurm numbering)."""
from __future__ import annotations

import torch


def expert_nodes(ep_ranks: list[int], num_experts: int, ranks_per_node: int) -> torch.Tensor:
    """Node of each expert [E]: expert e lives on expert-parallel rank e // (E / EP)."""
    per_rank = num_experts // len(ep_ranks)
    return torch.tensor([ep_ranks[e // per_rank] // ranks_per_node for e in range(num_experts)])


def cross_node_counts(routing_map: torch.Tensor, expert_node: torch.Tensor, own_node: int,
                      n_nodes: int) -> torch.Tensor:
    """[assignments to experts on other nodes, sum over tokens of distinct other nodes reached, tokens]
    for the routing map [T, E] (bool) of tokens on ``own_node``; ``expert_node`` [E] from
    :func:`expert_nodes`."""
    chosen = routing_map.float()
    remote = expert_node != own_node
    hits = torch.zeros(routing_map.shape[0], n_nodes, device=routing_map.device)
    hits.index_add_(1, expert_node.to(routing_map.device), chosen)
    hits[:, own_node] = 0
    return torch.stack([chosen[:, remote].sum(), (hits > 0).sum().float(),
                        torch.tensor(float(routing_map.shape[0]), device=routing_map.device)])
