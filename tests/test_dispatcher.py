"""The node-limited token dispatcher (megatron_dsv3.parallel.dispatcher) and its NodeTopology.

Pure checks (no world): node layouts, Megatron's EP groups from sizes, the routing-group == node
test, the FP8 1x128 quantiser's error bound.

One spawned 8-rank gloo world (tests/dispatcher_checks.py) then checks:
- NodeTopology over TP2xEP4, EP8, TP2xEP8 and a dp-before-ep order, ranks_per_node 2 and 4: the
  inter-/intra-node groups hold the right ranks; an uneven split is a clear error on every rank;
- the tiny DSv3 model (16 experts, top-4, n_group = nodes, topk_group 2) on EP8 as 2 nodes x 4 and
  4 nodes x 2, with TP1 and TP2 + SP: MoE-layer outputs, loss and EVERY gradient with node_limited
  equal Megatron's alltoall and the world-size-1 result (<= 1e-5 relative, fp32); hop-1 (cross-node)
  copies = sum over tokens of the distinct other destination nodes, exactly, on every rank; hop-2
  copies likewise; shared-expert overlap through the dispatcher hooks;
- FP8 dispatch: every dispatched element within the e4m3 bound |x - x~| <= 2^-4 |x| + 2^-10 s
  (s = tile amax / 448: round-to-nearest with 3 mantissa bits is 2^-4 relative for normals; below
  the smallest normal 2^-6 s the step is 2^-9 s); the run equal (1e-5) to the same layout in fp32
  whose experts see that quantise-dequantise of their input (straight-through gradient), close to
  the world-size-1 such model; dispatch payload (H + 4 ceil(H/128)) / (4H) of fp32's.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from distributed import run_world
from dispatcher_checks import (FP8_LAYOUTS, MOE_LAYOUTS, capture_moe, n_group_for, qdq_reference,
                               straight_through_qdq, world_body)
from parallel_checks import loss_and_grads

MODEL = dict(n_routed_experts=16, num_experts_per_tok=4, topk_group=2)
TOL = 1e-5


# --------------------------------------------------------------------------------------------
# pure
# --------------------------------------------------------------------------------------------
def test_node_layout_and_megatron_ep_groups():
    from megatron_dsv3.parallel.topology import TopologyError, expert_parallel_groups, node_layout

    # Megatron's default order: EP varies fastest among the expert dims (etp=1)
    assert expert_parallel_groups(8, tp=2, ep=4, etp=1) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_parallel_groups(8, tp=1, ep=4, order="tp-cp-dp-ep-pp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    lay = node_layout([0, 2, 4, 6], ranks_per_node=4)          # nodes {0, 2}, {4, 6}
    assert lay.nodes == (0, 1) and lay.local_size == 2
    assert lay.inter == ((0, 4), (2, 6)) and lay.intra == ((0, 2), (4, 6))
    assert lay.node_of == (0, 0, 1, 1) and lay.local_of == (0, 1, 0, 1)
    lay = node_layout(list(range(8)), ranks_per_node=2)
    assert lay.num_nodes == 4 and lay.inter == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert lay.expert_node(16) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    with pytest.raises(TopologyError, match="same number"):
        node_layout(list(range(8)), ranks_per_node=3)


def test_routing_groups_match_nodes():
    from megatron_dsv3.parallel.topology import routing_group_node_mismatch, routing_groups_match_nodes

    kw = dict(num_experts=16, ep_ranks=list(range(8)))
    assert routing_groups_match_nodes(n_group=2, ranks_per_node=4, **kw)
    assert routing_groups_match_nodes(n_group=4, ranks_per_node=2, **kw)
    assert "spans 2 node" in routing_group_node_mismatch(n_group=4, ranks_per_node=4, **kw)
    # dp-before-ep order: EP group [0, 2, 4, 6] on 2 nodes of 4 still keeps each node's experts together
    assert routing_groups_match_nodes(num_experts=16, n_group=2, ep_ranks=[0, 2, 4, 6], ranks_per_node=4)
    # an EP group whose order interleaves nodes: node 0 holds experts 0-3 and 8-11
    why = routing_group_node_mismatch(num_experts=16, n_group=2, ep_ranks=[0, 4, 1, 5], ranks_per_node=2)
    assert why is not None and "not the expert set of one node" in why


def test_fp8_quantiser_bound():
    from megatron_dsv3.parallel.dispatcher import dequantize_1x128, fp8_bytes_per_token, quantize_1x128

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 320, generator=g) * torch.logspace(-6, 3, 37).unsqueeze(1)
    x[3, 128:256] = 0                                           # an all-zero tile
    x[5, :7] = 1e-30                                            # deep subnormal in the scaled domain
    q, s = quantize_1x128(x)
    assert q.dtype == torch.uint8 and q.shape == (37, 320) and s.shape == (37, 3)
    y = dequantize_1x128(q, s, torch.float32)
    assert torch.equal(y, qdq_reference(x))
    amax = torch.stack([x[:, j:j + 128].abs().amax(1) for j in range(0, 320, 128)], 1)
    tile_amax = amax.repeat_interleave(128, 1)[:, :320]
    bound = x.abs() / 16 + tile_amax / 448 / 1024
    assert ((x - y).abs() <= bound).all()
    assert torch.equal(y[3, 128:256], torch.zeros(128))
    # the largest element of a tile survives exactly (scaled to 448)
    i = x[:, :128].abs().argmax(1)
    assert torch.allclose(y[torch.arange(37), i], x[torch.arange(37), i], rtol=1e-6, atol=0)
    assert fp8_bytes_per_token(7168) == 7168 + 4 * 56            # DSv3: 0.5156 of bf16


def test_megatron_sees_the_behaviour_the_dispatcher_declares():
    """node_limited declares Megatron's alltoall behaviour: Megatron-Core's config checks (shared-expert
    overlap, EP communication overlap) and its activation-freeing decision treat it like alltoall."""
    from megatron.core.models.common.utils import should_free_input

    from megatron_dsv3.config import DSv3Config, DSv3ConfigError, cpu_overrides
    from megatron_dsv3.parallel.dispatcher import NodeLimitedTokenDispatcher

    assert NodeLimitedTokenDispatcher.megatron_dispatcher == "alltoall"
    kw = dict(**cpu_overrides(), moe_shared_expert_overlap=True)
    ours = DSv3Config.from_preset("tiny", moe_token_dispatcher_type="node_limited", **kw)
    ref = DSv3Config.from_preset("tiny", moe_token_dispatcher_type="alltoall", **kw)
    assert (ours.token_dispatcher, ours.moe_token_dispatcher_type) == ("node_limited", "alltoall")
    assert ref.token_dispatcher is None
    for name in ("mlp", "moe_dispatch", "moe_combine"):
        for experts in (1, 4):
            assert should_free_input(name, True, ours, experts) == should_free_input(name, True, ref, experts), (name, experts)
    # the EP-overlap check: whatever Megatron says about alltoall, it says about node_limited
    outcomes = []
    for dispatcher in ("alltoall", "node_limited"):
        try:
            DSv3Config.from_preset("tiny", moe_token_dispatcher_type=dispatcher, overlap_moe_expert_parallel_comm=True,
                                   expert_model_parallel_size=2, **cpu_overrides())
            outcomes.append("ok")
        except (AssertionError, ValueError, DSv3ConfigError) as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1] and "alltoall/flex" not in outcomes[1], outcomes
    with pytest.raises(DSv3ConfigError, match="not a dispatcher class registered"):
        DSv3Config.from_preset("tiny", token_dispatcher="alltoall", **cpu_overrides())


# --------------------------------------------------------------------------------------------
# the 8-rank world
# --------------------------------------------------------------------------------------------
def _reference_run(ckpt, ids, labels, n_group, qdq=False):
    from megatron_dsv3 import hf

    model = hf.load(ckpt, n_group=n_group)
    handles = []
    if qdq:
        from dispatcher_checks import moe_layers

        handles = [m.experts.register_forward_pre_hook(straight_through_qdq) for _, m in moe_layers(model)]
    store, more = capture_moe(model)
    loss = loss_and_grads(model, ids, labels).item()
    for h in handles + more:
        h.remove()
    return {"ids": ids, "labels": labels, "loss": loss, "grads": hf.to_hf_state_dict(model, grads=True),
            "moe_out": store["out"], "expert_in": store["expert_in"]}


@pytest.fixture(scope="module")
def report(tmp_path_factory, cpu_world):
    from megatron_dsv3 import hf
    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.spec import build_model

    d = tmp_path_factory.mktemp("dispatch")
    ckpt = str(d / "ckpt")
    torch.manual_seed(11)
    model = build_model(DSv3Config.from_preset("tiny", **cpu_overrides(), **MODEL, n_group=2,
                                               init_method_std=0.05))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_(0, 0.05)
    hf.save(model, ckpt, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (8, 16), generator=gen)
    labels = torch.randint(0, 256, (8, 16), generator=gen)
    refs = {}
    for rpn in sorted({rpn for *_, rpn in MOE_LAYOUTS}):
        G = n_group_for(rpn)
        refs[G] = _reference_run(ckpt, ids, labels, G)
        if any(name in FP8_LAYOUTS for name, *_, r in MOE_LAYOUTS if r == rpn):
            refs[f"{G}_qdq"] = _reference_run(ckpt, ids, labels, G, qdq=True)
    torch.save(refs, d / "ref.pt")
    out = d / "report.json"
    run_world(8, world_body, ckpt, str(d / "ref.pt"), str(out))
    with open(out) as f:
        rep = json.load(f)
    print(json.dumps(rep, indent=1))
    return rep


def test_topology_in_world(report):
    topo = report["topology"]
    assert topo["tp2_ep4_tp-cp-ep-dp-pp_rpn2"]["nodes"] == 2 and topo["tp2_ep4_tp-cp-ep-dp-pp_rpn2"]["per_node"] == 2
    assert topo["tp2_ep4_tp-cp-ep-dp-pp_rpn4"]["nodes"] == 1
    assert topo["tp1_ep8_tp-cp-ep-dp-pp_rpn2"]["nodes"] == 4
    assert topo["tp1_ep8_tp-cp-ep-dp-pp_rpn4"]["per_node"] == 4
    assert topo["tp1_ep4_tp-cp-dp-ep-pp_rpn2"]["nodes"] == 4 and topo["tp1_ep4_tp-cp-dp-ep-pp_rpn2"]["per_node"] == 1
    assert topo["tp1_ep4_tp-cp-dp-ep-pp_rpn4"]["intra"] == [0, 2]      # rank 0's node, EP group [0,2,4,6]
    assert all(v["groups_match_nodes"] for k, v in topo.items() if k != "uneven_error")
    assert topo["uneven_error"] and "same number" in topo["uneven_error"]


@pytest.mark.parametrize("layout", [name for name, *_ in MOE_LAYOUTS])
def test_node_limited_matches_alltoall_and_world1(report, layout):
    entry = report["moe"][layout]
    for key in ("node_limited_vs_alltoall", "node_limited_vs_world1", "alltoall_vs_world1"):
        err = entry[key]
        assert err["loss_rel"] <= TOL and err["grad_rel"] <= TOL and err["moe_out_rel"] <= TOL, (key, err)


@pytest.mark.parametrize("layout", [name for name, *_ in MOE_LAYOUTS])
def test_cross_node_copies_exact(report, layout):
    for name, c in report["moe"][layout]["counts"].items():
        assert c["per_rank_exact"], (name, c)
        assert c["cross_node_copies"] == c["expected_cross_node_copies"] > 0
        assert c["intra_node_copies"] == c["expected_intra_node_copies"]
        # at most one copy per (token, other node) instead of one per (token, expert on another node)
        assert c["cross_node_copies"] <= c["alltoall_cross_node_rows"]
        # fp32 payload, dispatch + combine: world totals of sent bytes are twice the dispatch ones
        assert c["dispatch_bytes_cross_node"] == c["cross_node_copies"] * c["row_bytes"]
        assert c["bytes_cross_node"] == 2 * c["dispatch_bytes_cross_node"]
        assert c["bytes_intra_node"] == 2 * c["dispatch_bytes_intra_node"]


def test_shared_expert_overlap(report):
    err = report["moe"]["4x2_tp2sp"]["shared_expert_overlap_vs_alltoall"]
    assert err["loss_rel"] <= TOL and err["grad_rel"] <= TOL and err["moe_out_rel"] <= TOL, err


@pytest.mark.parametrize("layout", FP8_LAYOUTS)
def test_fp8_dispatch(report, layout):
    f8 = report["moe"][layout]["fp8"]
    assert f8["dispatched_bound"]["max_ratio_to_bound_all_ranks"] <= 1.0, f8["dispatched_bound"]
    # Same layout, node_limited in fp32 with the experts fed QDQ(x) (straight-through): identical
    # upstream numerics, so FP8 dispatch must match it like any fp32 parity.
    err = f8["vs_same_layout_qdq"]
    assert err["loss_rel"] <= TOL and err["grad_rel"] <= TOL and err["moe_out_rel"] <= TOL, err
    # Against the world-size-1 QDQ model the inputs of the quantiser differ by ~1e-7 (other reduction
    # orders), which can move an element across an e4m3 rounding boundary (one e4m3 step, 2^-3
    # relative, in that element): close, not 1e-5.
    err = f8["vs_world1_qdq"]
    assert err["loss_rel"] <= 1e-3 and err["grad_rel"] <= 5e-2 and err["moe_out_rel"] <= 1e-2, err
    # First MoE layer (same input and routing as fp32): the output moves by the quantisation alone.
    # Heuristic bound: no more than the inputs' worst relative error 2^-4 (measured ~2-3%). Later
    # layers are not compared with fp32: their routing changes on this tiny random model.
    assert f8["first_layer_out_rel_vs_fp32"] <= 2 ** -4, f8["first_layer_out_rel_vs_fp32"]
    H = 64
    fp8_row, fp32_row = H + 4 * math.ceil(H / 128), 4 * H
    for kind in ("dispatch_bytes_cross_node", "dispatch_bytes_intra_node"):
        b = f8[kind]
        assert b["fp8"] * fp32_row == b["fp32"] * fp8_row, (kind, b)  # (64 + 4) / 256: < half of bf16
    for name, c in f8["counts"].items():
        assert c["per_rank_exact"]
        # combine stays fp32: total = fp8 dispatch + fp32 combine
        assert c["bytes_cross_node"] == c["cross_node_copies"] * (fp8_row + fp32_row)


# --------------------------------------------------------------------------------------------
# launch checks (no process group)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world, extra, flag", [
    # tiny: 8 experts in n_group 4. EP 4 on nodes of 2 ranks = 2 nodes per EP group, not 4 groups
    (8, ["--expert-model-parallel-size", "4", "--ranks-per-node", "2"], "--moe-router-num-groups"),
    # ranks per node that do not split an EP group evenly: EP 4 over nodes of 3 (node 0 holds 3 of them)
    (12, ["--expert-model-parallel-size", "4", "--ranks-per-node", "3", "--moe-router-num-groups", "1",
          "--moe-router-group-topk", "1"], "--ranks-per-node"),
    # M larger than the nodes: routing groups are the 2 nodes of EP 4, but M = 4
    (8, ["--expert-model-parallel-size", "4", "--ranks-per-node", "2", "--moe-router-num-groups", "2",
         "--moe-router-group-topk", "4"], "--moe-router-group-topk"),
    # no ranks-per-node at all
    (4, ["--expert-model-parallel-size", "2"], "--ranks-per-node"),
])
def test_bad_node_limited_layouts_fail_before_any_process_group(monkeypatch, world, extra, flag):
    from megatron.core import parallel_state

    from launch import TINY
    from megatron_dsv3.training import launcher

    def refuse(*a, **k):
        raise AssertionError("a process group was built during the launch checks")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "new_group", refuse)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", refuse)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args = [a if a != "alltoall" else "node_limited" for a in TINY] + [
        "--train-iters", "2", "--expert-tensor-parallel-size", "1", "--micro-batch-size", "1",
        "--global-batch-size", str(world)]
    with pytest.raises(SystemExit) as info:
        launcher.prepare(args + extra)
    assert flag in str(info.value.code), info.value.code


def test_good_node_limited_layout_passes(monkeypatch):
    from launch import TINY
    from megatron_dsv3.training import launcher

    monkeypatch.setenv("WORLD_SIZE", "8")
    args = [a if a != "alltoall" else "node_limited" for a in TINY]
    ns = launcher.prepare(args + ["--train-iters", "2", "--expert-model-parallel-size", "8", "--ranks-per-node", "2",
                                  "--micro-batch-size", "1", "--global-batch-size", "8",
                                  "--expert-tensor-parallel-size", "1", "--moe-router-num-groups", "4",
                                  "--moe-dispatch-fp8"])
    assert ns.moe_token_dispatcher_type == "alltoall" and ns.dsv3_fields["token_dispatcher"] == "node_limited"
    assert ns.moe_dispatch_fp8 is True
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="--moe-dispatch-fp8"):
        launcher.prepare(TINY + ["--train-iters", "2", "--moe-dispatch-fp8"])


# --------------------------------------------------------------------------------------------
# the launcher
# --------------------------------------------------------------------------------------------
def test_launcher_node_limited_matches_alltoall_and_resumes_exactly(tmp_path):
    """The quickstart layout (TP2 x PP2 x EP2 on 4 ranks, each rank a node: --ranks-per-node 1, so
    routing groups = the 2 nodes of an EP group): per-step losses with node_limited equal alltoall's
    (<= 1e-5 relative); stopped at step 3 and resumed, node_limited continues bit for bit; the W&B
    metrics show the bytes it sent across nodes."""
    from launch import TINY, metrics, run_ok

    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
              "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1", "--ranks-per-node", "1",
              "--moe-router-num-groups", "2", "--moe-router-group-topk", "2", "--train-iters", "6"]
    runs = {}
    for name in ("alltoall", "node_limited"):
        args = [a if a != "alltoall" else name for a in TINY] + layout
        out = tmp_path / f"{name}.jsonl"
        extra = ["--save", str(tmp_path / "ckpt"), "--save-interval", "3"] if name == "node_limited" else []
        run_ok(4, args + extra + ["--metrics-jsonl", str(out)])
        runs[name] = metrics(str(out))
    for it in range(1, 7):
        a, n = runs["alltoall"][it]["train/lm_loss"], runs["node_limited"][it]["train/lm_loss"]
        assert abs(a - n) <= 1e-5 * abs(a), (it, a, n)
    nl = runs["node_limited"]
    assert nl[6]["moe/dispatch_bytes_cross_node"] > 0
    assert nl[6]["moe/remote_nodes_per_token"] <= nl[6]["moe/remote_experts_per_token"]
    resumed_ckpt = tmp_path / "resume"
    import shutil

    shutil.copytree(tmp_path / "ckpt" / "iter_0000003", resumed_ckpt / "iter_0000003")
    for f in (tmp_path / "ckpt" / "iter_0000003").parent.glob("*.json"):
        shutil.copy(f, resumed_ckpt)
    (resumed_ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    out = tmp_path / "resumed.jsonl"
    args = [a if a != "alltoall" else "node_limited" for a in TINY] + layout
    run_ok(4, args + ["--load", str(resumed_ckpt), "--metrics-jsonl", str(out)])
    resumed = metrics(str(out))
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed[it]["train/lm_loss"] == nl[it]["train/lm_loss"], it
        assert resumed[it]["train/grad_norm"] == nl[it]["train/grad_norm"], it


def test_bench_dispatch_at_its_defaults_halves_cross_node_bytes():
    """tools/bench_dispatch.py --json (4 nodes x 2 ranks, 64 experts top-8, node limit 4, hidden 256):
    node_limited sends at most half the cross-node bytes of Megatron's alltoall, same outputs."""
    import os
    import subprocess
    import sys

    from launch import ROOT

    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_dispatch.py"), "--json", "--reps", "1"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["cross_node_bytes_node_limited"] <= 0.5 * r["cross_node_bytes_flat"], r
    assert r["max_abs_diff"] <= 1e-5 and r["intra_node_bytes_node_limited"] > 0
    est = r["dsv3_estimate"]
    assert est["max_nodes_per_token"] <= 4 and est["ib_copies_per_token_node_limited"] < est["ib_copies_per_token_flat"]
