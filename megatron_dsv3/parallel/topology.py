"""Where the expert-parallel ranks sit on the cluster's nodes, for node-limited dispatch.

DeepSeek-V3 (report sec. 3.2.2) sends a token over the inter-node fabric (IB) at most once per
destination node, to the rank with the SAME in-node index there, which forwards it over the
intra-node fabric (NVLink) to the ranks of that node holding its experts. That needs, per
expert-parallel (EP) group, two families of process groups:

    EP group (EP = N nodes x R ranks on each), EP ranks in EP-group order p = 0 .. EP-1
      node of a global rank g      = g // ranks_per_node    (torchrun / Slurm numbering)
      node index n(p)              = position of p's node among the EP group's nodes, sorted
      local index l(p)             = position of p among the EP ranks on its node, sorted by global rank
      inter-node group I_l         = the N EP ranks with local index l   (one per node; group rank = n)
      intra-node group A_n         = the R EP ranks on node n            (group rank = l)
      expert e                     lives on EP rank e // (E / EP)

Every node of an EP group must hold the same number R of its ranks (else :class:`TopologyError`).

:class:`NodeTopology` is built ONCE and collectively: every rank of the world calls
:meth:`NodeTopology.build` in the same order (it all-gathers every rank's EP group, so it is right for
any TP/CP/EP/DP/PP ordering Megatron, or a caller's own ``ProcessGroupCollection``, produced, then
creates the inter- and intra-node groups of EVERY EP group, as ``torch.distributed.new_group`` asks).

Also the cross-node routing metric's maths (:func:`expert_nodes`, :func:`cross_node_counts`).

Pure helpers (no process groups) for launch-time checks: :func:`node_layout`,
:func:`expert_parallel_groups` (the EP groups Megatron's ``initialize_model_parallel`` builds from the
sizes) and :func:`routing_groups_match_nodes` / :func:`routing_group_node_mismatch`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist


class TopologyError(ValueError):
    """The EP ranks cannot be laid out as N nodes x R ranks each."""


# --------------------------------------------------------------------------------------------
# Pure layout maths
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeLayout:
    """The node layout of ONE EP group (global ranks ``ep_ranks`` in EP-group order).

    nodes:       the global node ids of the group, sorted                        [N]
    node_of:     node index n(p) of each EP rank p                               [EP]
    local_of:    local index l(p) of each EP rank p                              [EP]
    inter:       inter-node groups: inter[l] = global ranks with local index l   [R][N] (node order)
    intra:       intra-node groups: intra[n] = global ranks on node n            [N][R] (local order)
    """

    ep_ranks: tuple
    ranks_per_node: int
    nodes: tuple
    node_of: tuple
    local_of: tuple
    inter: tuple
    intra: tuple

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def local_size(self) -> int:
        """R: EP ranks of this group on each of its nodes."""
        return len(self.intra[0])

    def expert_ep_rank(self, num_experts: int) -> list[int]:
        """EP rank holding each expert: e // (E / EP)."""
        ep = len(self.ep_ranks)
        if num_experts % ep:
            raise TopologyError(f"{num_experts} experts do not divide over {ep} EP ranks")
        per = num_experts // ep
        return [e // per for e in range(num_experts)]

    def expert_node(self, num_experts: int) -> list[int]:
        """Node index (0 .. N-1) of each expert."""
        return [self.node_of[p] for p in self.expert_ep_rank(num_experts)]

    def node_experts(self, num_experts: int) -> list[list[int]]:
        """Experts of each node n, ordered by (local index of their rank, expert id)."""
        owner = self.expert_ep_rank(num_experts)
        out = [[] for _ in self.nodes]
        for e in sorted(range(num_experts), key=lambda e: (self.local_of[owner[e]], e)):
            out[self.node_of[owner[e]]].append(e)
        return out


def node_layout(ep_ranks: Sequence[int], ranks_per_node: int) -> NodeLayout:
    """Group one EP group's global ranks (in EP-group order) by node; a pure function."""
    ep_ranks = tuple(int(r) for r in ep_ranks)
    if ranks_per_node is None or ranks_per_node < 1:
        raise TopologyError(f"ranks_per_node must be a positive integer, got {ranks_per_node!r}")
    if len(set(ep_ranks)) != len(ep_ranks):
        raise TopologyError(f"EP group {list(ep_ranks)} repeats a rank")
    nodes = tuple(sorted({r // ranks_per_node for r in ep_ranks}))
    on_node = {n: sorted(r for r in ep_ranks if r // ranks_per_node == n) for n in nodes}
    sizes = {n: len(v) for n, v in on_node.items()}
    if len(set(sizes.values())) != 1:
        detail = ", ".join(f"node {n}: {len(v)} ({v})" for n, v in on_node.items())
        raise TopologyError(
            f"node-limited dispatch needs every node of an EP group to hold the same number of its "
            f"ranks; EP group {list(ep_ranks)} with ranks_per_node={ranks_per_node} has {detail}. "
            f"Choose ranks_per_node / expert_model_parallel_size / the parallel order so that each "
            f"EP group spans whole nodes evenly.")
    node_index = {n: i for i, n in enumerate(nodes)}
    node_of = tuple(node_index[r // ranks_per_node] for r in ep_ranks)
    local_of = tuple(on_node[r // ranks_per_node].index(r) for r in ep_ranks)
    R = next(iter(sizes.values()))
    inter = tuple(tuple(on_node[n][l] for n in nodes) for l in range(R))
    intra = tuple(tuple(on_node[n]) for n in nodes)
    return NodeLayout(ep_ranks, ranks_per_node, nodes, node_of, local_of, inter, intra)


def expert_parallel_groups(world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1,
                           etp: Optional[int] = None, cp: int = 1,
                           order: str = "tp-cp-ep-dp-pp") -> list[list[int]]:
    """The EP groups (global ranks, EP-group order) Megatron-Core 0.19.2's
    ``initialize_model_parallel`` builds for these sizes; a pure function (no process groups).

    ``etp`` defaults to ``tp`` as in Megatron. (The expert GTP-remat axis is taken as 1.)
    """
    from megatron.core.parallel_state import RankGenerator

    etp = tp if etp is None else etp
    if world_size % (tp * pp * cp) or world_size % (etp * ep * pp):
        raise TopologyError(f"world size {world_size} does not split into tp={tp} cp={cp} pp={pp} / "
                            f"etp={etp} ep={ep} pp={pp}")
    gen = RankGenerator(tp=etp, ep=ep, dp=world_size // (etp * ep * pp), pp=pp, cp=1,
                        order=order)
    return gen.get_ranks("ep")


def routing_group_node_mismatch(*, num_experts: int, n_group: int, ep_ranks: Sequence[int],
                                ranks_per_node: int) -> Optional[str]:
    """None when DSv3's routing groups coincide with the nodes of this EP group, else why not.

    Coincide: n_group == number of nodes N, and the experts of routing group g
    (``[g E/G, (g+1) E/G)``) are exactly the experts held by one node. Then ``topk_group`` (M)
    caps the nodes a token is sent to at M, as in DSv3's node-limited routing. Pure function.
    """
    lay = node_layout(ep_ranks, ranks_per_node)
    N = lay.num_nodes
    if n_group != N:
        return f"n_group={n_group} but the EP group spans {N} node(s)"
    if num_experts % n_group:
        return f"n_group={n_group} does not divide {num_experts} experts"
    per_group = num_experts // n_group
    node_sets = [frozenset(v) for v in lay.node_experts(num_experts)]
    for g in range(n_group):
        experts = frozenset(range(g * per_group, (g + 1) * per_group))
        if experts not in node_sets:
            return (f"routing group {g} (experts {g * per_group}..{(g + 1) * per_group - 1}) is not the "
                    f"expert set of one node (node expert sets: {[sorted(s) for s in node_sets]})")
    return None


def routing_groups_match_nodes(*, num_experts: int, n_group: int, ep_ranks: Sequence[int],
                               ranks_per_node: int) -> bool:
    """True when routing groups coincide with this EP group's nodes (see
    :func:`routing_group_node_mismatch`)."""
    return routing_group_node_mismatch(num_experts=num_experts, n_group=n_group, ep_ranks=ep_ranks,
                                       ranks_per_node=ranks_per_node) is None


# --------------------------------------------------------------------------------------------
# The process groups
# --------------------------------------------------------------------------------------------
def _comm_device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ep_groups(ep_group) -> list[tuple[int, ...]]:
    """Every EP group of the world (sorted), from each rank's own; collective over the world."""
    mine = dist.get_process_group_ranks(ep_group) if ep_group is not None else [dist.get_rank()]
    dev = _comm_device()
    size = torch.tensor([len(mine)], dtype=torch.long, device=dev)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.full((longest,), -1, dtype=torch.long, device=dev)
    padded[: len(mine)] = torch.tensor(mine, dtype=torch.long)
    rows = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(rows, padded)
    groups = {tuple(int(r) for r in row.tolist() if r >= 0) for row in rows}
    return sorted(groups)


@dataclass
class NodeTopology:
    """This rank's place in its EP group's node layout, with the inter-/intra-node groups.

    Build with :meth:`build` (collective). Attributes:
      layout        NodeLayout of this rank's EP group
      ep_group      the EP process group it was built from
      ep_rank       this rank's EP rank (group rank in ``ep_group``)
      node_index    n: this rank's node among the EP group's N nodes
      local_index   l: this rank's index among the R EP ranks on its node
      inter_group   I_l (size N; group rank == node index)
      intra_group   A_n (size R; group rank == local index)
    """

    layout: NodeLayout
    ep_group: object = field(repr=False)
    ep_rank: int
    node_index: int
    local_index: int
    inter_group: object = field(repr=False)
    intra_group: object = field(repr=False)

    @property
    def num_nodes(self) -> int:
        return self.layout.num_nodes

    @property
    def local_size(self) -> int:
        return self.layout.local_size

    @property
    def ranks_per_node(self) -> int:
        return self.layout.ranks_per_node

    @classmethod
    def build(cls, ep_group, ranks_per_node: int) -> "NodeTopology":
        """Collective over the WHOLE world: every rank calls this, in the same order relative to its
        other group creations. ``ep_group``: this rank's expert-parallel group (None = EP 1)."""
        if not dist.is_initialized():
            raise RuntimeError("NodeTopology.build needs torch.distributed to be initialised")
        groups = _all_ep_groups(ep_group)
        covered = sorted(r for g in groups for r in g)
        if covered != list(range(dist.get_world_size())):
            raise TopologyError(f"the EP groups {groups} do not partition the world")
        layouts = [node_layout(g, ranks_per_node) for g in groups]   # raises on every rank alike
        me = dist.get_rank()
        mine = None
        inter_group = intra_group = None
        for lay in layouts:            # same order on every rank: new_group is collective
            for ranks in lay.inter:
                g = dist.new_group(list(ranks))
                if me in ranks:
                    inter_group = g
            for ranks in lay.intra:
                g = dist.new_group(list(ranks))
                if me in ranks:
                    intra_group = g
            if me in lay.ep_ranks:
                mine = lay
        p = mine.ep_ranks.index(me)
        if ep_group is not None and dist.get_group_rank(ep_group, me) != p:
            raise TopologyError("EP group rank order differs from get_process_group_ranks order")
        topo = cls(layout=mine, ep_group=ep_group, ep_rank=p, node_index=mine.node_of[p],
                   local_index=mine.local_of[p], inter_group=inter_group, intra_group=intra_group)
        # torch orders a group's ranks by global rank; the layout's node / local order is that order.
        assert dist.get_group_rank(inter_group, me) == topo.node_index
        assert dist.get_group_rank(intra_group, me) == topo.local_index
        return topo

    # ---- expert placement (tensors for the dispatcher) ----
    def expert_node(self, num_experts: int) -> torch.Tensor:
        """[E] node index of each expert."""
        return torch.tensor(self.layout.expert_node(num_experts), dtype=torch.long)

    def node_expert_order(self, num_experts: int) -> torch.Tensor:
        """[E] permutation: experts grouped by node, then by local index of their rank, then id.

        ``probs[:, order].view(T, N, R, E_local)[t, n, l, j]`` is the weight of the j-th expert of the
        rank with local index l on node n."""
        return torch.tensor([e for node in self.layout.node_experts(num_experts) for e in node],
                            dtype=torch.long)

    def describe(self) -> str:
        lay = self.layout
        return (f"EP {len(lay.ep_ranks)} = {lay.num_nodes} node(s) x {lay.local_size}; EP rank {self.ep_rank} "
                f"is node {self.node_index} local {self.local_index}; inter {lay.inter[self.local_index]}, "
                f"intra {lay.intra[self.node_index]}")


# --------------------------------------------------------------------------------------------
# The cross-node routing metric (training/metrics.py)
# --------------------------------------------------------------------------------------------
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
