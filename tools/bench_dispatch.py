"""Bytes on the wire and time of Megatron-Core's flat ``alltoall`` token dispatcher vs megatron-dsv3's
``node_limited`` one, on gloo ranks simulating nodes; plus the estimate for DeepSeek-V3's real layout.

    .venv/bin/python tools/bench_dispatch.py                       # 4 nodes x 2 ranks, 64 experts, top-8
    .venv/bin/python tools/bench_dispatch.py --nodes 2 --ranks-per-node 4 --fp8 --json
    .venv/bin/python tools/bench_dispatch.py --estimate-only       # DSv3 671B layout, no processes

Every rank routes its own tokens (its own seed) through ONE DeepSeekMoE layer (our router with
node-limited routing: n_group = nodes, topk_group = --node-limit), once with Megatron's alltoall
dispatcher and once with node_limited, same weights. Counted for one forward pass, summed over
ranks, hidden-state payload only (the routing metadata both send is small and listed apart):
- flat: a row to every EP rank holding one of the token's experts (Megatron's permutation), and the
  same rows back in combine; bytes to ranks on other nodes are "cross-node".
- node_limited: the dispatcher's own count (``last_bytes``): one copy per (token, destination node)
  across nodes, forwarded inside the node; combine mirrors it.
Wall time here is CPU/gloo time on this machine (2 cores shared by all ranks): it shows overheads, not
what IB/NVLink would do; the byte counts are exact. The estimate for the real layout multiplies the
expected copies per token (Monte Carlo over routing with balanced, random scores) by the bytes per
copy, at the report's per-GPU bandwidths (IB 50 GB/s, NVLink 160 GB/s).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --------------------------------------------------------------------------------------------
# estimate for a layout (no processes)
# --------------------------------------------------------------------------------------------
def estimate(experts=256, topk=8, nodes=8, ranks_per_node=8, node_limit=4, hidden=7168, tokens=20000,
             ib_gbs=50.0, nvlink_gbs=160.0, seed=0) -> dict:
    """Expected copies per token of flat vs node-limited dispatch, and the transfer time per token per
    GPU at the given bandwidths (dispatch in bf16 and in FP8 with 1x128 scales; combine in bf16)."""
    from megatron_dsv3.model.router import route

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    _, _, idx = route(logits, top_k=topk, n_group=nodes, topk_group=node_limit, scoring="sigmoid",
                      bias=torch.zeros(experts), norm_topk_prob=True, scaling=1.0)
    per_node, per_rank = experts // nodes, experts // (nodes * ranks_per_node)
    node, rank = idx // per_node, idx // per_rank                  # [T, K]
    own_node = torch.randint(0, nodes, (tokens,), generator=g)      # the token's source node
    own_rank = own_node * ranks_per_node + torch.randint(0, ranks_per_node, (tokens,), generator=g)
    flat_ib = (node != own_node[:, None]).sum(1).float()
    flat_nv = ((node == own_node[:, None]) & (rank != own_rank[:, None])).sum(1).float()
    hit_nodes = torch.zeros(tokens, nodes, dtype=torch.bool).scatter(1, node, True)
    nl_ib = hit_nodes.sum(1).float() - hit_nodes.gather(1, own_node[:, None]).squeeze(1).float()
    # inside each destination node the relay (same local index as the source) forwards to the other
    # ranks holding the token's experts there: distinct (node, rank) pairs minus relays
    relay = torch.stack([n * ranks_per_node + own_rank % ranks_per_node for n in range(nodes)], 1)  # [T, N]
    hit_ranks = torch.zeros(tokens, nodes * ranks_per_node, dtype=torch.bool).scatter(1, rank, True)
    nl_nv = hit_ranks.sum(1).float() - hit_ranks.gather(1, relay).logical_and(hit_nodes).sum(1).float()
    bf16, fp8 = 2 * hidden, hidden + 4 * math.ceil(hidden / 128)
    out = {"experts": experts, "topk": topk, "nodes": nodes, "ranks_per_node": ranks_per_node,
           "node_limit": node_limit, "hidden": hidden,
           "ib_copies_per_token_flat": flat_ib.mean().item(), "ib_copies_per_token_node_limited": nl_ib.mean().item(),
           "nvlink_copies_per_token_flat": flat_nv.mean().item(),
           "nvlink_copies_per_token_node_limited": nl_nv.mean().item(),
           "max_nodes_per_token": int(hit_nodes.sum(1).max())}
    for name, dispatch in (("bf16", bf16), ("fp8", fp8)):
        for kind, ib, nv in (("flat", flat_ib, flat_nv), ("node_limited", nl_ib, nl_nv)):
            # dispatch + combine (combine always bf16)
            ib_bytes = ib.mean().item() * (dispatch + bf16)
            nv_bytes = nv.mean().item() * (dispatch + bf16)
            out[f"ib_us_per_token_{kind}_{name}"] = ib_bytes / (ib_gbs * 1e9) * 1e6
            out[f"nvlink_us_per_token_{kind}_{name}"] = nv_bytes / (nvlink_gbs * 1e9) * 1e6
    return out


# --------------------------------------------------------------------------------------------
# the gloo run
# --------------------------------------------------------------------------------------------
def _moe_layer(cfg, topology):
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
    from megatron.core.transformer.mlp import MLPSubmodules
    from functools import partial

    from megatron_dsv3.model.backends import local_backend
    from megatron_dsv3.model.moe import DSv3MoELayer
    from megatron_dsv3.model.router import DSv3Router

    b = local_backend(cfg)
    swiglu = MLPSubmodules(linear_fc1=b.column, linear_fc2=b.row)
    sub = MoESubmodules(experts=b.experts, shared_experts=partial(SharedExpertMLP, submodules=swiglu),
                        router=DSv3Router)
    layer = DSv3MoELayer(cfg, submodules=sub, layer_number=1, topology=topology)
    layer.router.set_layer_number(1)
    return layer.train()


def _flat_bytes(dispatcher, hidden: int, elem: int, rpn: int) -> tuple[float, float]:
    """Rows Megatron's alltoall dispatcher sent / received per EP rank (its split sizes), as bytes to
    other nodes and to other ranks of this node, dispatch + combine."""
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(dispatcher.ep_group)
    me = dist.get_rank()
    sent = [int(x) for x in dispatcher.input_splits]      # rows to each EP rank (dispatch)
    back = [int(x) for x in dispatcher.output_splits]     # rows from each EP rank = combine sends back
    cross = intra = 0
    for r, (a, b) in enumerate(zip(sent, back)):
        if ranks[r] == me:
            continue
        if ranks[r] // rpn != me // rpn:
            cross += a + b
        else:
            intra += a + b
    return cross * hidden * elem, intra * hidden * elem


def world_body(rank: int, opts: dict, out_path: str):
    import torch.distributed as dist

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.model.spec import build_topology
    from megatron_dsv3.parallel.world import init_model_parallel

    world = dist.get_world_size()
    init_model_parallel(ep=world)
    common = dict(num_layers=2, first_k_dense_replace=0, hidden_size=opts["hidden"], num_attention_heads=4,
                  n_routed_experts=opts["experts"], num_experts_per_tok=opts["topk"], n_group=opts["nodes"],
                  topk_group=opts["node_limit"], moe_intermediate_size=opts["ffn"], n_shared_experts=1,
                  seq_aux_alpha=0.0, bias_update_rate=0.0, mtp_num_layers=None, ranks_per_node=opts["rpn"],
                  expert_model_parallel_size=world, **cpu_overrides())
    flat_cfg = DSv3Config.from_preset("tiny", moe_token_dispatcher_type="alltoall", **common)
    nl_cfg = DSv3Config.from_preset("tiny", moe_token_dispatcher_type="node_limited",
                                    moe_dispatch_fp8=opts["fp8"], **common)
    torch.manual_seed(1234 + rank)
    flat = _moe_layer(flat_cfg, None)
    nl = _moe_layer(nl_cfg, build_topology(nl_cfg))
    nl.load_state_dict(flat.state_dict())
    g = torch.Generator().manual_seed(77 + rank)
    x = torch.randn(opts["tokens"], 1, opts["hidden"], generator=g)
    results = {}
    for name, layer in (("flat", flat), ("node_limited", nl)):
        times = []
        for rep in range(opts["reps"] + 1):
            inp = x.clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            out, _ = layer(inp)
            out.float().square().sum().backward()
            dist.barrier()
            if rep:                                      # the first is a warm-up
                times.append(time.perf_counter() - t0)
        if name == "flat":
            cross, intra = _flat_bytes(layer.token_dispatcher, opts["hidden"], 4, opts["rpn"])
        else:
            cross, intra = layer.token_dispatcher.last_bytes["cross_node"], layer.token_dispatcher.last_bytes["intra_node"]
        t = torch.tensor([cross, intra], dtype=torch.float64)
        dist.all_reduce(t)
        results[name] = {"out": out.detach(), "cross": t[0].item(), "intra": t[1].item(),
                         "time": statistics.median(times)}
    diff = torch.tensor([(results["flat"]["out"] - results["node_limited"]["out"]).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    times = torch.tensor([results["flat"]["time"], results["node_limited"]["time"]])
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"cross_node_bytes_flat": results["flat"]["cross"],
                       "cross_node_bytes_node_limited": results["node_limited"]["cross"],
                       "intra_node_bytes_flat": results["flat"]["intra"],
                       "intra_node_bytes_node_limited": results["node_limited"]["intra"],
                       "max_abs_diff": diff.item(), "time_ms_flat": times[0].item() * 1e3,
                       "time_ms_node_limited": times[1].item() * 1e3}, f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--node-limit", type=int, default=4, help="M: nodes a token may reach (topk_group)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=64, help="expert width")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fp8", action="store_true", help="node_limited dispatches FP8 (1x128 scales)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--estimate-only", action="store_true", help="only the DeepSeek-V3 layout estimate")
    a = ap.parse_args(argv)
    est = estimate()
    if a.estimate_only:
        print(json.dumps(est) if a.json else _estimate_table(est))
        return
    from megatron_dsv3.parallel.world import run_cpu_world

    opts = dict(nodes=a.nodes, rpn=a.ranks_per_node, experts=a.experts, topk=a.topk, node_limit=a.node_limit,
                hidden=a.hidden, ffn=a.ffn, tokens=a.tokens, reps=a.reps, fp8=a.fp8)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        run_cpu_world(a.nodes * a.ranks_per_node, world_body, opts, out)
        with open(out) as f:
            result = json.load(f)
    result.update({k: v for k, v in opts.items()}, cross_node_ratio=result["cross_node_bytes_node_limited"]
                  / max(result["cross_node_bytes_flat"], 1))
    if a.json:
        print(json.dumps({**result, "dsv3_estimate": est}))
        return
    print(f"{a.nodes} nodes x {a.ranks_per_node} ranks, {a.experts} experts top-{a.topk}, node limit "
          f"{a.node_limit}, hidden {a.hidden}, {a.tokens} tokens/rank, fp32"
          + (", node_limited dispatch in FP8" if a.fp8 else "") + "; bytes of one forward pass (dispatch + combine; "
          "the backward sends as much again), all ranks; time: forward + backward")
    print(f"{'dispatcher':<14} {'cross-node bytes':>18} {'intra-node bytes':>18} {'time (ms)':>10}")
    for name, key in (("alltoall", "flat"), ("node_limited", "node_limited")):
        print(f"{name:<14} {result['cross_node_bytes_' + key]:>18,.0f} {result['intra_node_bytes_' + key]:>18,.0f} "
              f"{result['time_ms_' + key]:>10.1f}")
    print(f"cross-node bytes node_limited / alltoall = {result['cross_node_ratio']:.3f}; max |output diff| = "
          f"{result['max_abs_diff']:.2e}\n")
    print(_estimate_table(est))


def _estimate_table(e: dict) -> str:
    lines = [f"DeepSeek-V3 layout: {e['experts']} experts, top-{e['topk']}, EP{e['nodes'] * e['ranks_per_node']} on "
             f"{e['nodes']} nodes of {e['ranks_per_node']}, M = {e['node_limit']}, hidden {e['hidden']} "
             f"(random balanced routing; IB 50 GB/s, NVLink 160 GB/s per GPU; dispatch + combine per token)",
             f"{'':<14} {'IB copies':>10} {'NVLink copies':>14} {'IB us (bf16)':>13} {'IB us (fp8 disp.)':>18}"]
    for kind in ("flat", "node_limited"):
        lines.append(f"{kind:<14} {e['ib_copies_per_token_' + kind]:>10.2f} {e['nvlink_copies_per_token_' + kind]:>14.2f} "
                     f"{e['ib_us_per_token_' + kind + '_bf16']:>13.3f} {e['ib_us_per_token_' + kind + '_fp8']:>18.3f}")
    lines.append(f"max nodes per token: {e['max_nodes_per_token']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
