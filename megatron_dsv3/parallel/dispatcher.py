"""Node-limited all-to-all token dispatcher (DeepSeek-V3 report sec. 3.2.2), pure torch.distributed.

A token crosses the inter-node fabric at most ONCE per destination node that holds at least one of
its chosen experts, landing on the rank with the same in-node index there (the relay); the relay
forwards it inside the node to the ranks holding its experts. Combine mirrors it: each expert
rank sums its weighted expert outputs per token, the relay sums over its node's ranks, and ONE
vector per (token, node) goes back over the inter-node fabric; the source sums over nodes.

Registered as ``--moe-token-dispatcher-type node_limited``. It provides the behaviour of Megatron's
``alltoall`` dispatcher (:attr:`NodeLimitedTokenDispatcher.megatron_dispatcher`): Megatron-Core's own
checks and code paths that test the dispatcher name (shared-expert overlap, expert-parallel
communication overlap, activation freeing) see ``alltoall``.

Legend (one EP group; see :mod:`megatron_dsv3.parallel.topology`):
    T      tokens on this rank (the MoE input [s, b, h] flattened; [s/TP, b, h] under SP)
    H      hidden size;  E experts;  K experts per token
    N      nodes in the EP group;  R EP ranks per node;  EL = E / (N R) experts per rank
    EN     = R * EL experts per node
    C1     (token, node) copies this rank sends in hop 1   (one per token and node it needs)
    C1r    hop-1 copies this rank receives as a relay
    C2     (copy, rank) copies this relay sends in hop 2   (one per copy and local rank it needs)
    C2r    hop-2 copies this rank receives (its expert inputs, one per token and rank)
    P      (token, local expert) rows for this rank's experts = C2r rows expanded by their mask

Messages (all ``all_to_all_single`` with split sizes as Python lists; the split sizes are
exchanged first with an equal-split all-to-all of int64 counts):
    hop 1, inter-node group I_l (same local index l on every node), sorted by destination node:
        hidden [C1, H]  (training dtype, or FP8 e4m3 bytes [C1, H] uint8 + fp32 scales [C1, ceil(H/128)])
        probs  [C1, EN] the token's routing weights for the destination node's experts (autograd)
        mask   [C1, EN] uint8, which of those experts are chosen (metadata)
    hop 2, intra-node group A_n (the node's R ranks), sorted by destination local index:
        hidden [C2, H], probs [C2, EL], mask [C2, EL]: the slices for the destination rank's experts
    combine, in reverse: hop 2 back [C2r, H] -> relay sums per hop-1 copy -> hop 1 back [C1r, H]
        (always in the training dtype).

Combine weights: like Megatron's experts with the alltoall dispatcher, the experts receive the
permuted probs and scale their own output (SequentialMLP / TEGroupedMLP multiply the activation by
them), so every partial sum in combine is already weighted: expert rank ``sum_e w_e f_e(x)`` over
its experts, relay sums over its node's ranks, source sums over nodes; gradients reach the router
through the dispatched probs.

TP / sequence parallelism: as Megatron's alltoall dispatcher with expert-tensor-parallel size 1,
every TP rank dispatches its own sequence shard (the EP group spans the attention-TP ranks); no
TP collective happens in the dispatcher. Expert TP > 1 is refused. Shared experts: computed by
MoELayer, or overlapped through the same hooks Megatron's alltoall dispatcher calls
(``moe_shared_expert_overlap``).

``last_bytes`` (per forward, bytes of hidden-state payload this rank SENT in dispatch + combine;
copies to itself count nowhere; scales count for FP8):
    cross_node   hop-1 payload to other nodes (dispatch + combine)
    intra_node   hop-2 payload to other ranks of the same node (dispatch + combine)
``last_counts`` has the token-copy counts behind them and the metadata bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import all_to_all
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from ..registry import DISPATCHERS, register
from .topology import NodeTopology

TILE = 128            #: FP8 dispatch: hidden channels per scale (one 1x128 tile of one token)
E4M3_MAX = 448.0      #: largest finite float8_e4m3fn


# --------------------------------------------------------------------------------------------
# FP8 1x128 tiles
# --------------------------------------------------------------------------------------------
def quantize_1x128(x: torch.Tensor):
    """x [C, H] -> (e4m3 bytes [C, H] uint8, fp32 scales [C, ceil(H/128)]).

    Tile = 128 consecutive channels of one token (the last may be shorter); scale = amax / 448 (1 for
    an all-zero tile), q = e4m3(x / scale) with round-to-nearest-even.
    """
    C, H = x.shape
    nt = math.ceil(H / TILE)
    tiles = F.pad(x.float(), (0, nt * TILE - H)).view(C, nt, TILE)
    amax = tiles.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale.unsqueeze(-1)).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(C, nt * TILE)[:, :H].contiguous().view(torch.uint8), scale


def dequantize_1x128(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(e4m3 bytes [C, H] uint8, scales [C, ceil(H/128)]) -> [C, H] in ``dtype``."""
    C, H = q.shape
    nt = scale.shape[1]
    f = F.pad(q.view(torch.float8_e4m3fn).float(), (0, nt * TILE - H)).view(C, nt, TILE)
    return (f * scale.unsqueeze(-1)).view(C, nt * TILE)[:, :H].to(dtype)


def fp8_bytes_per_token(hidden: int) -> int:
    """Payload of one FP8-dispatched token: H e4m3 bytes + one fp32 scale per 1x128 tile."""
    return hidden + 4 * math.ceil(hidden / TILE)


# --------------------------------------------------------------------------------------------
# Communication helpers
# --------------------------------------------------------------------------------------------
def _size(group) -> int:
    return 1 if group is None else group.size()


def _exchange_counts(send: List[int], group, device) -> List[int]:
    """Counts to send to each group rank -> counts to receive from each (equal-split all-to-all)."""
    if _size(group) == 1:
        return list(send)
    t = torch.tensor(send, dtype=torch.long, device=device)
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out.tolist()


def _a2a(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    """Plain (non-autograd) uneven all-to-all along dim 0."""
    if _size(group) == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


@dataclass
class _Plan:
    """The routing of one forward pass (index tensors and split sizes; no autograd)."""

    src_token: torch.Tensor        # [C1]  hop-1 copy -> local token
    send1: List[int]               # [N]   hop-1 copies to each node
    recv1: List[int]               # [N]   hop-1 copies from each node
    relay_copy: torch.Tensor       # [C2]  hop-2 copy -> received hop-1 copy (relay side)
    send2: List[int]               # [R]   hop-2 copies to each local rank
    recv2: List[int]               # [R]   hop-2 copies from each local rank
    inter: object
    intra: object


class _Fp8TwoHopDispatch(torch.autograd.Function):
    """copies [C1, H] -> expert inputs [C2r, H]: quantised once at the source, relayed as FP8 bytes,
    dequantised on arrival. Backward: the gradient returns along the same two hops in the training
    dtype (straight-through: the quantiser counts as identity), summed at the relay per copy."""

    @staticmethod
    def forward(ctx, copies, plan: _Plan):
        q, s = quantize_1x128(copies)
        q1, s1 = (_a2a(t, plan.recv1, plan.send1, plan.inter) for t in (q, s))
        q2, s2 = (_a2a(t.index_select(0, plan.relay_copy), plan.recv2, plan.send2, plan.intra)
                  for t in (q1, s1))
        ctx.plan, ctx.relay_rows = plan, q1.shape[0]
        return dequantize_1x128(q2, s2, copies.dtype)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        g2 = _a2a(grad, plan.send2, plan.recv2, plan.intra)
        g1 = grad.new_zeros((ctx.relay_rows, grad.shape[1])).index_add_(0, plan.relay_copy, g2)
        return _a2a(g1, plan.send1, plan.recv1, plan.inter), None


# --------------------------------------------------------------------------------------------
# The dispatcher
# --------------------------------------------------------------------------------------------
@register(DISPATCHERS, "node_limited")
class NodeLimitedTokenDispatcher(MoETokenDispatcher):
    """Megatron-Core 0.19.2 token dispatcher: node-limited two-hop all-to-all (see module doc).

    Constructor as ``MoEAlltoAllTokenDispatcher`` plus ``topology`` (a :class:`NodeTopology` built
    once, collectively, from this EP group and ``config.ranks_per_node``). ``config.moe_dispatch_fp8``
    sends the dispatched activations as e4m3 with one fp32 scale per 1x128 tile.
    """

    #: The Megatron-Core dispatcher whose behaviour this one provides: Megatron's config checks and
    #: code paths that test ``moe_token_dispatcher_type`` see this name.
    megatron_dispatcher = "alltoall"
    #: DSv3MoELayer passes its NodeTopology to dispatcher classes that set this.
    needs_topology = True
    #: honours ``config.moe_dispatch_fp8``.
    supports_fp8_dispatch = True
    #: runs overlapped shared experts in its stages (``moe_shared_expert_overlap``), as alltoall does.
    overlaps_shared_experts = True

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config,
                 pg_collection=None, *, topology: Optional[NodeTopology] = None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if topology is None:
            raise ValueError(
                "NodeLimitedTokenDispatcher needs a NodeTopology: build the model with "
                "megatron_dsv3.spec.build_model (it builds one from config.ranks_per_node) or pass "
                "topology= down the layer spec")
        if self.tp_size != 1:
            raise NotImplementedError("node_limited dispatcher: expert_tensor_parallel_size > 1 is not supported")
        if config.moe_expert_capacity_factor is not None or config.moe_pad_expert_input_to_capacity:
            raise NotImplementedError("node_limited dispatcher: token dropping / capacity padding is not supported")
        if config.moe_router_padding_for_quantization:
            raise NotImplementedError("node_limited dispatcher: moe_router_padding_for_quantization is not supported")
        ep_ranks = dist.get_process_group_ranks(self.ep_group) if self.ep_size > 1 else [dist.get_rank()]
        if list(topology.layout.ep_ranks) != list(ep_ranks):
            raise ValueError(f"NodeTopology was built for EP group {list(topology.layout.ep_ranks)}, "
                             f"this layer's EP group is {ep_ranks}")
        self.topology = topology
        self.num_experts = config.num_moe_experts
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        N, R = topology.num_nodes, topology.local_size
        if self.num_experts != N * R * num_local_experts:
            raise ValueError(f"{self.num_experts} experts != {N} nodes x {R} ranks x {num_local_experts}")
        first = self.ep_rank * num_local_experts
        if self.local_expert_indices != list(range(first, first + num_local_experts)):
            raise ValueError(f"local experts {self.local_expert_indices} are not EP rank {self.ep_rank}'s "
                             f"contiguous block")
        self.N, self.R, self.EL = N, R, num_local_experts
        self.expert_order = topology.node_expert_order(self.num_experts)
        self.fp8 = bool(getattr(config, "moe_dispatch_fp8", False))
        self.shared_experts = None
        self.last_bytes = {"cross_node": 0, "intra_node": 0}
        self.last_counts: dict = {}

    # ---------------------------------------------------------------- dispatch
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        """Local only: one hop-1 copy per (token, destination node), sorted by node.

        hidden_states [s, b, H] (or [T, H]), routing_map [T, E] bool, probs [T, E]
        -> (copies [C1, H], copy probs [C1, EN]); copy masks kept for token_dispatch."""
        self.hidden_shape = hidden_states.shape
        self.routing_map, self.probs = routing_map, probs
        x = hidden_states.reshape(-1, self.hidden_shape[-1])
        T = self._T = x.shape[0]
        order = self.expert_order.to(routing_map.device)
        mask = routing_map.index_select(1, order).view(T, self.N, self.R * self.EL)
        node_probs = probs.index_select(1, order).view(T, self.N, self.R * self.EL)
        hit = mask.any(dim=-1)                                            # [T, N]
        node, token = hit.t().nonzero(as_tuple=True)                      # sorted by node, then token
        self._src_token = token
        self._send1 = hit.sum(dim=0).tolist()
        self._copy_mask = mask[token, node].to(torch.uint8)               # [C1, EN]
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        return x.index_select(0, token), node_probs[token, node]

    def token_dispatch(self, copies: torch.Tensor, copy_probs: torch.Tensor):
        """Hop 1 over the inter-node group, relay, hop 2 over the intra-node group.

        copies [C1, H], copy_probs [C1, EN] -> (expert inputs [C2r, H], probs [C2r, EL])."""
        topo = self.topology
        if self.shared_experts is not None:
            self.shared_experts.wait_current_stream()
        send1 = self._send1
        recv1 = _exchange_counts(send1, topo.inter_group, copies.device)
        mask1 = _a2a(self._copy_mask, recv1, send1, topo.inter_group)     # [C1r, EN]
        C1r = mask1.shape[0]
        rank_mask = mask1.view(C1r, self.R, self.EL).bool()
        hit2 = rank_mask.any(dim=-1)                                       # [C1r, R]
        local, copy = hit2.t().nonzero(as_tuple=True)                      # sorted by local rank
        send2 = hit2.sum(dim=0).tolist()
        recv2 = _exchange_counts(send2, topo.intra_group, copies.device)
        mask2 = _a2a(rank_mask[copy, local].to(torch.uint8), recv2, send2, topo.intra_group)
        plan = _Plan(self._src_token, send1, recv1, copy, send2, recv2, topo.inter_group, topo.intra_group)
        self._plan, self._recv_mask = plan, mask2.bool()                   # [C2r, EL]

        if self.fp8:
            tokens = _Fp8TwoHopDispatch.apply(copies, plan)
        else:
            at_relay = all_to_all(topo.inter_group, copies, recv1, send1)
            tokens = all_to_all(topo.intra_group, at_relay.index_select(0, copy), recv2, send2)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(tokens)
        probs1 = all_to_all(topo.inter_group, copy_probs, recv1, send1)
        probs2 = all_to_all(topo.intra_group, probs1.view(C1r, self.R, self.EL)[copy, local], recv2, send2)
        self._account(copies.shape[-1], copies.element_size(), copy_probs.element_size())
        return tokens, probs2

    def dispatch_postprocess(self, tokens: torch.Tensor, probs: torch.Tensor):
        """Local only: one row per (received token, chosen local expert), sorted by expert.

        -> (permuted tokens [P, H], tokens_per_expert [EL] (CPU int64), permuted probs [P])."""
        mask = self._recv_mask
        expert, row = mask.t().nonzero(as_tuple=True)
        self._perm_row, self._rows = row, mask.shape[0]
        tokens_per_expert = mask.sum(dim=0).to(torch.long).cpu()
        return tokens.index_select(0, row), tokens_per_expert, probs[row, expert]

    # ---------------------------------------------------------------- combine
    def combine_preprocess(self, hidden_states: torch.Tensor):
        """Local only: expert outputs [P, H] (already weighted by the experts) summed per received
        token -> [C2r, H]."""
        out = hidden_states.new_zeros((self._rows, hidden_states.shape[-1]))
        return out.index_add(0, self._perm_row, hidden_states)

    def token_combine(self, hidden_states: torch.Tensor):
        """Hop 2 back, relay sums its node's ranks per hop-1 copy, hop 1 back.

        [C2r, H] -> [C1, H] (one vector per (token, node), at the source)."""
        plan, topo = self._plan, self.topology
        if self.shared_experts is not None:
            self.shared_experts.wait_current_stream()
        at_relay = all_to_all(topo.intra_group, hidden_states, plan.send2, plan.recv2)
        per_copy = at_relay.new_zeros((sum(plan.recv1), at_relay.shape[-1])).index_add(
            0, plan.relay_copy, at_relay)
        out = all_to_all(topo.inter_group, per_copy, plan.send1, plan.recv1)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(out)
            self.shared_experts.post_forward_comm()
        self._account_combine(hidden_states.element_size() * hidden_states.shape[-1])
        return out

    def combine_postprocess(self, hidden_states: torch.Tensor):
        """Local only: sum over destination nodes -> the MoE output in the input's shape."""
        out = hidden_states.new_zeros((self.hidden_shape.numel() // self.hidden_shape[-1],
                                       hidden_states.shape[-1]))
        out = out.index_add(0, self._plan.src_token, hidden_states).view(self.hidden_shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts.get_output()
        return out

    # ---------------------------------------------------------------- byte counts
    def _account(self, H: int, elem: int, prob_elem: int):
        p, topo = self._plan, self.topology
        row = fp8_bytes_per_token(H) if self.fp8 else elem * H
        cross = sum(p.send1) - p.send1[topo.node_index]
        intra = sum(p.send2) - p.send2[topo.local_index]
        self.last_counts = {
            "tokens": self._T, "copies_cross_node": cross, "copies_intra_node": intra,
            "copies_to_own_node": p.send1[topo.node_index],
            "dispatch_cross_node_bytes": cross * row, "dispatch_intra_node_bytes": intra * row,
            # routing metadata sent with the copies (probs + uint8 chosen-expert masks), not in last_bytes
            "metadata_bytes": (cross * self.R + intra) * self.EL * (prob_elem + 1),
        }
        self.last_bytes = {"cross_node": cross * row, "intra_node": intra * row}

    def _account_combine(self, row: int):
        p, topo = self._plan, self.topology
        cross = sum(p.recv1) - p.recv1[topo.node_index]
        intra = sum(p.recv2) - p.recv2[topo.local_index]
        self.last_counts.update(combine_cross_node_bytes=cross * row, combine_intra_node_bytes=intra * row)
        self.last_bytes = {"cross_node": self.last_bytes["cross_node"] + cross * row,
                           "intra_node": self.last_bytes["intra_node"] + intra * row}
