"""Rank bodies for tests/test_dispatcher.py (importable by spawned processes).

One 8-rank world runs: the NodeTopology checks over several TP/EP/order/ranks_per_node layouts, then
per MoE layout (EP8 as 2 nodes x 4 and 4 nodes x 2, each with TP1 and TP2 + SP) the full tiny DSv3
model with Megatron's ``alltoall`` and our ``node_limited`` dispatcher (and FP8 dispatch), recording
MoE-layer outputs, loss, every gradient and the dispatch counts. Rank 0 writes a JSON report;
comparisons against the world-size-1 reference (computed in the pytest process) happen here too.
"""
from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist

from parallel_checks import loss_and_grads, sync_grads

WORLD = 8
#: (name, tp, ep, ranks_per_node): the MoE-layer parity layouts (EP8: 2 nodes x 4, 4 nodes x 2).
MOE_LAYOUTS = [("2x4_tp1", 1, 8, 4), ("4x2_tp1", 1, 8, 2), ("2x4_tp2sp", 2, 8, 4), ("4x2_tp2sp", 2, 8, 2)]
#: layouts also run with FP8 dispatch
FP8_LAYOUTS = ("2x4_tp2sp", "4x2_tp1")
#: (tp, ep, order, ranks_per_node) for the topology checks.
TOPO_LAYOUTS = [(2, 4, "tp-cp-ep-dp-pp", 2), (2, 4, "tp-cp-ep-dp-pp", 4), (1, 8, "tp-cp-ep-dp-pp", 2),
                (1, 8, "tp-cp-ep-dp-pp", 4), (2, 8, "tp-cp-ep-dp-pp", 2), (1, 4, "tp-cp-dp-ep-pp", 2),
                (1, 4, "tp-cp-dp-ep-pp", 4), (2, 2, "tp-cp-dp-ep-pp", 2)]


def n_group_for(rpn: int) -> int:
    return WORLD // rpn


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
_CURRENT = [None]


def init_parallel(tp: int, ep: int, order: str = "tp-cp-ep-dp-pp", reuse: bool = False):
    """Megatron's groups for these sizes (kept when ``reuse`` and the sizes are unchanged: Megatron
    creates ~100 gloo groups per initialisation)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsv3.parallel.world import destroy_model_parallel

    if reuse and _CURRENT[0] == (tp, ep, order) and ps.model_parallel_is_initialized():
        return
    _CURRENT[0] = (tp, ep, order)
    destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=1, order=order)
    model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    torch.manual_seed(1234)


def moe_layers(model):
    from megatron_dsv3.model.moe import DSv3MoELayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, DSv3MoELayer)]


def capture_moe(model):
    """Forward hooks: each MoE layer's output [s_local, b_local, H], and the routed experts' input."""
    store = {"out": {}, "expert_in": {}}
    handles = []
    for name, m in moe_layers(model):
        handles.append(m.register_forward_hook(
            lambda mod, args, out, name=name: store["out"].__setitem__(name, out[0].detach().clone())))
        handles.append(m.experts.register_forward_pre_hook(
            lambda mod, args, name=name: store["expert_in"].__setitem__(name, args[0].detach().clone())))
    return store, handles


def gather_full(t: torch.Tensor, tp: int) -> torch.Tensor:
    """[s/TP, b/DP, H] -> [s, b, H] (SP over the TP group, batch over the DP group)."""
    from megatron.core import parallel_state as ps

    if tp > 1:
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
        t = torch.cat(parts, 0)
    dp = ps.get_data_parallel_world_size()
    if dp > 1:
        parts = [torch.empty_like(t) for _ in range(dp)]
        dist.all_gather(parts, t.contiguous(), group=ps.get_data_parallel_group())
        t = torch.cat(parts, 1)
    return t


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def worst_rel(a: dict, b: dict) -> tuple[float, str]:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:3]
    return max((rel(a[k], b[k]), k) for k in a)


def expected_counts(routing_map: torch.Tensor, ep_ranks: list[int], rpn: int, me: int) -> dict:
    """Independent count of what node-limited and plain all-to-all dispatch send from this rank.

    routing_map [T, E]; expert e on global rank ep_ranks[e // (E / EP)]; node = rank // rpn."""
    E = routing_map.shape[1]
    per = E // len(ep_ranks)
    own_node = me // rpn
    my_local = sorted(r for r in ep_ranks if r // rpn == own_node).index(me)
    cross_nodes = cross_pairs = intra = 0
    for row in routing_map.tolist():
        ranks = {ep_ranks[e // per] for e, chosen in enumerate(row) if chosen}
        nodes = {r // rpn for r in ranks}
        cross_nodes += len(nodes - {own_node})                         # node-limited hop-1 copies
        cross_pairs += sum(1 for e, chosen in enumerate(row) if chosen and ep_ranks[e // per] // rpn != own_node)
        for m in nodes:                                                 # hop 2 at the relay on node m
            on_m = sorted(r for r in ep_ranks if r // rpn == m)
            intra += sum(1 for r in ranks if r // rpn == m and on_m.index(r) != my_local)
    return {"cross_node_copies": cross_nodes, "alltoall_cross_node_rows": cross_pairs, "intra_node_copies": intra}


# --------------------------------------------------------------------------------------------
# topology checks
# --------------------------------------------------------------------------------------------
def topology_checks(rank: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_dsv3.parallel.topology import (NodeTopology, TopologyError, expert_parallel_groups, node_layout,
                                        routing_groups_match_nodes)

    out = {}
    for tp, ep, order, rpn in TOPO_LAYOUTS:
        key = f"tp{tp}_ep{ep}_{order}_rpn{rpn}"
        init_parallel(tp, ep, order)
        ep_group = ps.get_expert_model_parallel_group()
        topo = NodeTopology.build(ep_group, rpn)
        ep_ranks = dist.get_process_group_ranks(ep_group)
        # the pure function sees the same EP groups as Megatron built
        pure = expert_parallel_groups(WORLD, tp=tp, ep=ep, etp=1, order=order)
        assert ep_ranks in pure, (ep_ranks, pure)
        assert topo.layout == node_layout(ep_ranks, rpn)
        # inter-node group: one rank per node of my EP group, same local index, ordered by node
        info = torch.tensor([rank // rpn, topo.local_index, topo.node_index, ps.get_expert_model_parallel_rank()])
        inter = [torch.empty_like(info) for _ in range(topo.inter_group.size())]
        dist.all_gather(inter, info, group=topo.inter_group)
        nodes = [int(t[0]) for t in inter]
        assert nodes == sorted(set(nodes)) and len(nodes) == topo.num_nodes, nodes
        assert {int(t[1]) for t in inter} == {topo.local_index}
        assert [int(t[2]) for t in inter] == list(range(topo.num_nodes))
        assert all(ep_ranks[int(t[3])] // rpn == int(t[0]) for t in inter)
        intra = [torch.empty_like(info) for _ in range(topo.intra_group.size())]
        dist.all_gather(intra, info, group=topo.intra_group)
        assert {int(t[0]) for t in intra} == {rank // rpn}
        assert [int(t[1]) for t in intra] == list(range(topo.local_size))
        E = 16
        match = routing_groups_match_nodes(num_experts=E, n_group=topo.num_nodes, ep_ranks=ep_ranks,
                                           ranks_per_node=rpn)
        out[key] = {"ep_group": ep_ranks, "nodes": topo.num_nodes, "per_node": topo.local_size,
                    "inter": list(topo.layout.inter[topo.local_index]),
                    "intra": list(topo.layout.intra[topo.node_index]), "groups_match_nodes": match}
    # an EP group that does not split evenly over nodes: a clear error on every rank
    init_parallel(1, 8)
    try:
        NodeTopology.build(ps.get_expert_model_parallel_group(), 3)
        out["uneven_error"] = None
    except TopologyError as e:
        out["uneven_error"] = str(e)
    dist.barrier()
    return out


# --------------------------------------------------------------------------------------------
# MoE parity
# --------------------------------------------------------------------------------------------
def qdq_reference(x: torch.Tensor) -> torch.Tensor:
    """Independent e4m3 1x128 quantise-dequantise, tile by tile (straight loops)."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(0, x.shape[1], 128):
            tile = x[i, j:j + 128].float()
            amax = tile.abs().max()
            s = amax / 448 if amax > 0 else torch.tensor(1.0)
            out[i, j:j + 128] = ((tile / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(x.dtype)
    return out


def straight_through_qdq(module, args):
    """Experts forward pre-hook: the experts see QDQ(x); the gradient passes straight through."""
    x = args[0]
    return (x + (qdq_reference(x.detach()) - x).detach(), *args[1:])


def run_model(ckpt: str, ref: dict, tp: int, ep: int, rpn: int, dispatcher: str, fp8: bool = False,
              overlap: bool = False, qdq_hook: bool = False) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_dsv3 import hf

    init_parallel(tp, ep, reuse=True)
    overrides = dict(n_group=n_group_for(rpn), ranks_per_node=rpn, moe_dispatch_fp8=fp8)
    if overlap:   # Megatron's config check lets alltoall/flex overlap the shared experts: node_limited
        overrides["moe_shared_expert_overlap"] = True      # declares alltoall's behaviour
    model = hf.load(ckpt, moe_token_dispatcher_type=dispatcher, **overrides)
    handles = [m.experts.register_forward_pre_hook(straight_through_qdq)
               for _, m in moe_layers(model)] if qdq_hook else []
    store, more = capture_moe(model)
    handles += more
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ids = ref["ids"].chunk(dp)[dp_rank]
    labels = ref["labels"].chunk(dp)[dp_rank]
    loss = loss_and_grads(model, ids, labels)
    for h in handles:
        h.remove()
    sync_grads(model)
    grads = hf.to_hf_state_dict(model, grads=True)
    losses = torch.zeros(dp)
    losses[dp_rank] = loss
    dist.all_reduce(losses, group=ps.get_data_parallel_group())
    result = {"loss": losses.mean().item(), "grads": grads,
              "moe_out": {n: gather_full(t, tp) for n, t in store["out"].items()},
              "expert_in": store["expert_in"]}
    # dispatch counts against an independent count from the routing map
    counts = {}
    if dispatcher == "node_limited":
        me = dist.get_rank()
        ep_ranks = dist.get_process_group_ranks(ps.get_expert_model_parallel_group())
        for name, m in moe_layers(model):
            d = m.token_dispatcher
            exp = expected_counts(d.routing_map, ep_ranks, rpn, me)
            got = d.last_counts
            H = model.config.hidden_size
            row = (H + 4 * math.ceil(H / 128)) if fp8 else 4 * H
            t = torch.tensor([got["copies_cross_node"], exp["cross_node_copies"], got["copies_intra_node"],
                              exp["intra_node_copies"], exp["alltoall_cross_node_rows"],
                              d.last_bytes["cross_node"], d.last_bytes["intra_node"],
                              got["dispatch_cross_node_bytes"], got["dispatch_intra_node_bytes"],
                              got["tokens"], row], dtype=torch.float64)
            # hop-1 copies are sent by the token's own rank: exact per rank. (Hop-2 copies are sent by
            # the relays, so only the world totals compare.)
            ok = torch.tensor([float(got["copies_cross_node"] == exp["cross_node_copies"])])
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            world = t.clone()
            dist.all_reduce(world)
            counts[name] = {
                "per_rank_exact": bool(ok.item() == 1.0),
                "cross_node_copies": int(world[0]), "expected_cross_node_copies": int(world[1]),
                "intra_node_copies": int(world[2]), "expected_intra_node_copies": int(world[3]),
                "alltoall_cross_node_rows": int(world[4]),
                "bytes_cross_node": int(world[5]), "bytes_intra_node": int(world[6]),
                "dispatch_bytes_cross_node": int(world[7]), "dispatch_bytes_intra_node": int(world[8]),
                "tokens": int(world[9]), "row_bytes": int(t[10]),
            }
    result["counts"] = counts
    del model
    return result


def compare(a: dict, b: dict) -> dict:
    g, gk = worst_rel(a["grads"], b["grads"])
    o, ok = worst_rel(a["moe_out"], b["moe_out"])
    return {"loss_rel": abs(a["loss"] - b["loss"]) / abs(b["loss"]), "grad_rel": g, "grad_worst": gk,
            "moe_out_rel": o, "moe_out_worst": ok}


def fp8_bound_check(x: torch.Tensor, xq: torch.Tensor) -> dict:
    """|x - x~| <= 2^-4 |x| + 2^-10 * amax(tile) / 448 elementwise (e4m3: 3 mantissa bits; smallest
    normal 2^-6, subnormal spacing 2^-9 in the scaled domain)."""
    C, H = x.shape
    nt = math.ceil(H / 128)
    tiles = torch.nn.functional.pad(x, (0, nt * 128 - H)).view(C, nt, 128)
    amax = tiles.abs().amax(-1, keepdim=True).expand(C, nt, 128).reshape(C, nt * 128)[:, :H]
    bound = x.abs() / 16 + amax / 448 / 1024
    err = (x - xq).abs()
    return {"max_ratio_to_bound": (err / bound.clamp(min=1e-30)).max().item(),
            "max_rel_err": (err / x.abs().clamp(min=1e-30)).max().item() if C else 0.0,
            "exact_rows": C}


def world_body(rank: int, ckpt: str, ref_path: str, out_path: str):
    import time

    t0 = time.perf_counter()
    report = {"topology": topology_checks(rank)}
    seconds = {"topology": time.perf_counter() - t0}
    refs = torch.load(ref_path)
    moe = {}
    for name, tp, ep, rpn in MOE_LAYOUTS:
        ref = refs[n_group_for(rpn)]
        a2a = run_model(ckpt, ref, tp, ep, rpn, "alltoall")
        nl = run_model(ckpt, ref, tp, ep, rpn, "node_limited")
        entry = {"node_limited_vs_alltoall": compare(nl, a2a), "node_limited_vs_world1": compare(nl, ref),
                 "alltoall_vs_world1": compare(a2a, ref), "counts": nl["counts"]}
        if name in FP8_LAYOUTS:
            f8 = run_model(ckpt, ref, tp, ep, rpn, "node_limited", fp8=True)
            first = sorted(f8["expert_in"])[0]   # first MoE layer: same input and routing as fp32
            first_out = first
            qdq = run_model(ckpt, ref, tp, ep, rpn, "node_limited", qdq_hook=True)
            entry["fp8"] = {
                "vs_same_layout_qdq": compare(f8, qdq),
                "vs_world1_qdq": compare(f8, refs[f"{n_group_for(rpn)}_qdq"]),
                "vs_fp32": compare(f8, nl),
                # the first MoE layer sees the same input and routing in both: the quantisation alone
                "first_layer_out_rel_vs_fp32": rel(f8["moe_out"][first_out], nl["moe_out"][first_out]),
                "dispatched_bound": fp8_bound_check(nl["expert_in"][first], f8["expert_in"][first]),
                "first_layer": first,
                "dispatch_bytes_cross_node": {"fp8": f8["counts"][first]["dispatch_bytes_cross_node"],
                                              "fp32": nl["counts"][first]["dispatch_bytes_cross_node"]},
                "dispatch_bytes_intra_node": {"fp8": f8["counts"][first]["dispatch_bytes_intra_node"],
                                              "fp32": nl["counts"][first]["dispatch_bytes_intra_node"]},
                "counts": f8["counts"],
            }
            # the local bound check, gathered over ranks
            t = torch.tensor([entry["fp8"]["dispatched_bound"]["max_ratio_to_bound"]])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            entry["fp8"]["dispatched_bound"]["max_ratio_to_bound_all_ranks"] = t.item()
        if name == "4x2_tp2sp":
            ov = run_model(ckpt, ref, tp, ep, rpn, "node_limited", overlap=True)
            entry["shared_expert_overlap_vs_alltoall"] = compare(ov, a2a)
        moe[name] = entry
        seconds[name] = time.perf_counter() - t0
    report["moe"] = moe
    report["seconds"] = seconds
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
