"""The pipeline-order definition and its simulator (pure Python; no process group):

1. our DualPipe / DualPipeV orders equal the orders DeepSeek's reference executes (recorded on CPU,
   tests/data/dualpipe_reference);
2. the simulator reproduces Table 2 of the DeepSeek-V3 report (bubbles, activations, parameters);
3. every order is a valid, deadlock-free schedule; Megatron-Core's interleaved order is reproduced
   from its own schedule table;
4. tools/schedule.py (--json, --ops, --png, errors naming the flag).
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
from fractions import Fraction as Fr

import pytest

from megatron_dsv3.parallel.schedules import order
from megatron_dsv3.parallel.schedules.simulate import simulate, table2_bubble

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDED = sorted(glob.glob(os.path.join(HERE, "data", "dualpipe_reference", "*.json")))


# ---- 1. the reference's order ------------------------------------------------------------------
def test_recordings_present():
    names = {os.path.basename(p) for p in RECORDED}
    want = {f"{s}_n{n}_m{m}.json" for s in ("dualpipe", "dualpipev") for n in (2, 4, 8)
            for m in (2 * n, 2 * n + 2, 4 * n)}
    assert want <= names, sorted(want - names)


@pytest.mark.parametrize("path", RECORDED, ids=os.path.basename)
def test_matches_reference_recording(path):
    doc = json.load(open(path))
    assert len(doc["ranks"]) == doc["n"]
    assert order.ops(doc["schedule"], doc["n"], doc["m"]) == doc["ranks"]


# ---- 2. Table 2 ---------------------------------------------------------------------------------
F, W = Fr(1), Fr(1, 2)
B = F + W                        # B - W = F: a split backward's input part costs one forward
PPS = (4, 8, 16)


def ms(pp):
    return (2 * pp, 2 * pp + 2, 4 * pp)


@pytest.mark.parametrize("fb", [B, Fr(2), Fr(11, 5), F + B])   # B <= F&B <= F + B
@pytest.mark.parametrize("pp", PPS)
def test_dualpipe_bubble_is_table2(pp, fb):
    """(PP/2-1)(F&B+B-3W) exactly, for DualPipe on PP ranks and DualPipeV on PP/2 ranks."""
    want = (Fr(pp, 2) - 1) * (fb + B - 3 * W)
    assert table2_bubble("dualpipe", pp, F, B, W, fb) == want == table2_bubble("dualpipev", pp // 2, F, B, W, fb)
    for m in ms(pp):
        assert simulate("dualpipe", pp, m, F, B, W, fb)["bubble"] == want
        assert simulate("dualpipev", pp // 2, m, F, B, W, fb)["bubble"] == want


@pytest.mark.parametrize("f,b,w,fb", [
    (F, B, W, F + B + Fr(1, 2)),          # F&B slower than F + B
    (F, B, W, B - Fr(1, 4)),              # F&B shorter than B
    (F, Fr(5, 2), Fr(3, 2), Fr(3)),       # B - W = F but W > F
    (F, Fr(2), Fr(1, 2), Fr(5, 2)),       # B - W > F
    (F, Fr(2), Fr(3, 2), Fr(5, 2)),       # B - W < F
])
def test_dualpipe_formula_is_only_an_estimate_elsewhere(f, b, w, fb):
    """Outside B - W = F, W <= F, B <= F&B <= F + B the simulated bubble differs from the formula."""
    assert simulate("dualpipe", 8, 16, f, b, w, fb)["bubble"] != table2_bubble("dualpipe", 8, f, b, w, fb)


def test_dualpipe_formula_is_an_upper_estimate_where_input_grads_are_not_cheap():
    """With F <= B - W, W <= B - W and B <= F&B <= F + B the simulated bubble never exceeds the formula
    (a sweep); with cheaper input grads (B - W < F) it can."""
    grid = [Fr(x, 4) for x in range(1, 13)]
    checked = 0
    for b in grid:
        for w in grid:
            if not (w < b and F <= b - w and w <= b - w):
                continue
            for fb in (b, (F + 2 * b) / 2, F + b):
                for pp in (4, 8):
                    sim = simulate("dualpipe", pp, 2 * pp + 2, F, b, w, fb)["bubble"]
                    assert sim <= table2_bubble("dualpipe", pp, F, b, w, fb)
                    checked += 1
    assert checked > 100
    cheap = (F, Fr(3, 2), Fr(1), Fr(2))                      # B - W < F
    assert simulate("dualpipe", 8, 18, *cheap)["bubble"] > table2_bubble("dualpipe", 8, *cheap)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("f,b", [(F, B), (Fr(1), Fr(2)), (Fr(3, 4), Fr(5, 2))])
def test_1f1b_bubble_is_table2(pp, f, b):
    for m in (pp, *ms(pp)):
        assert simulate("1f1b", pp, m, f, b, 0)["bubble"] == (pp - 1) * (f + b) == table2_bubble("1f1b", pp, f, b, 0)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("f,b,w", [(F, B, W), (Fr(1), Fr(2), Fr(1)), (Fr(3, 2), Fr(2), Fr(1, 2))])
def test_zb1p_bubble_is_table2(pp, f, b, w):          # exact while W <= min(F, B - W)
    for m in (pp, *ms(pp)):
        assert simulate("zb1p", pp, m, f, b, w)["bubble"] == (pp - 1) * (f + b - 2 * w)


@pytest.mark.parametrize("pp", PPS)
def test_activations_and_parameters_are_table2(pp):
    """Peak activations PP (1F1B) vs PP+1 (DualPipe; the +1 is the overlapped pair's second
    micro-batch); parameters 1x vs 2x (DualPipeV: 2 stages per rank, one copy)."""
    for m in ms(pp):
        one, zb = simulate("1f1b", pp, m), simulate("zb1p", pp, m)
        dp, dpv = simulate("dualpipe", pp, m), simulate("dualpipev", pp // 2, m)
        assert one["peak_activations"] == pp == one["activations"][0]
        assert zb["peak_activations"] == pp == zb["peak_activations_until_w"]
        assert dp["peak_activations"] == pp + 1 == dp["peak_activations_until_w"]
        assert dpv["peak_activations"] == pp + 1 == dpv["peak_activations_until_w"]
        assert (one["param_copies"], one["params_per_rank"]) == (1, 1)
        assert (dp["param_copies"], dp["params_per_rank"]) == (2, 2)
        assert (dpv["param_copies"], dpv["params_per_rank"], dpv["pp_stages"]) == (1, 2, pp)


def test_timeline_is_the_order():
    s = simulate("dualpipe", 4, 10, 1, 1.5, 0.5, 2.2)
    for r, tl in enumerate(s["timeline"]):
        assert [op for op, _, _ in tl] == order.ops("dualpipe", 4, 10)[r]
        assert all(s1 >= e0 for (_, _, e0), (_, s1, _) in zip(tl, tl[1:]))
    assert s["makespan"] == max(tl[-1][2] for tl in s["timeline"])


# ---- 3. validity ------------------------------------------------------------------------------------
def _cases():
    for n in range(1, 9):
        for m in range(1, 4 * n + 5):
            for sched in order.SCHEDULES:
                try:
                    order.validate(sched, n, m)
                except order.OrderError:
                    continue
                yield sched, n, m


def test_every_order_is_valid_and_runs():
    count = 0
    for sched, n, m in _cases():
        rank_ops = order.ops(sched, n, m)
        order.check_valid(sched, n, m, rank_ops)
        simulate(sched, n, m)                                   # raises on a deadlock
        forwards = [[order.fmt([p for p in order.parse(op) if p.kind == "F"]) for op in seq
                     if any(p.kind == "F" for p in order.parse(op))] for seq in rank_ops]
        simulate(sched, n, m, rank_ops=forwards)                # forward-only (evaluation) runs too
        count += 1
    assert count > 300


def test_placement_is_consistent():
    for sched in order.SCHEDULES:
        for n in (1, 2, 4):
            if sched == "dualpipe" and n % 2:
                continue
            at = order.layout(sched, n)
            for r in range(n):
                for c in range(order.chunks_per_rank(sched)):
                    assert order.where(sched, n, *at(r, c)) == (r, c)
    assert order.layout("dualpipe", 4)(1, 1) == (1, 2)      # rank 1 holds stage 2 of the second direction
    assert order.layout("dualpipev", 4)(1, 1) == (0, 6)
    assert order.global_micro_batch("dualpipe", 10, 1, 2) == 7


def test_check_valid_catches_errors():
    bad = [list(x) for x in order.ops("zb1p", 4, 8)]
    bad[3].remove("W0:0")
    with pytest.raises(order.OrderError, match="weight grads never run"):
        order.check_valid("zb1p", 4, 8, bad)
    bad = [list(x) for x in order.ops("1f1b", 2, 2)]
    bad[1] = ["B0:0", "F0:0", "F0:1", "B0:1"]
    with pytest.raises(order.OrderError, match="before its forward"):
        order.check_valid("1f1b", 2, 2, bad)
    with pytest.raises(order.OrderError, match="pair"):
        order.parse("B0:1+F1:0")


def test_deadlock_detected():
    rank_ops = [["F0:0", "F0:1", "B0:0", "B0:1"], ["F0:1", "F0:0", "B0:0", "B0:1"]]
    simulate("1f1b", 2, 2, rank_ops=rank_ops)                  # rank 1 just waits for micro-batch 1
    rank_ops = [["F0:0", "B0:0", "F0:1", "B0:1"], ["F0:1", "B0:1", "F0:0", "B0:0"]]
    with pytest.raises(ValueError, match="deadlock"):
        simulate("1f1b", 2, 2, rank_ops=rank_ops)


def test_1f1b_and_zb1p_small():
    assert order.ops("1f1b", 3, 4) == [
        ["F0:0", "F0:1", "F0:2", "B0:0", "F0:3", "B0:1", "B0:2", "B0:3"],
        ["F0:0", "F0:1", "B0:0", "F0:2", "B0:1", "F0:3", "B0:2", "B0:3"],
        ["F0:0", "B0:0", "F0:1", "B0:1", "F0:2", "B0:2", "F0:3", "B0:3"],
    ]
    assert order.ops("zb1p", 3, 4)[1] == ["F0:0", "F0:1", "Bi0:0", "F0:2", "Bi0:1", "W0:0", "F0:3",
                                          "Bi0:2", "W0:1", "Bi0:3", "W0:2", "W0:3"]


def _megatron_interleaved(n, m, r, group):
    """The interleaved order assembled from Megatron-Core's own schedule table and warm-up count."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel import schedules

    class Group:
        def size(self):
            return n

        def rank(self):
            return r

    comm = SimpleNamespace(pp_group=Group(), virtual_pipeline_model_parallel_size=2)
    _, _, warmup, remaining = schedules.get_pp_rank_microbatches(m, 2, group, p2p_communicator=comm)
    table = schedules.get_schedule_table(m, 2, group)
    fwd = [f"F{c}:{j}" for j, c in table]
    bwd = [f"B{1 - c}:{j}" for j, c in table]
    return fwd[:warmup] + [x for k in range(remaining) for x in (fwd[warmup + k], bwd[k])] + bwd[remaining:]


@pytest.mark.parametrize("n,m,group", [(2, 2, None), (2, 6, None), (4, 8, None), (4, 12, None), (4, 4, None),
                                       (8, 16, None), (4, 14, 5), (3, 11, 4), (2, 5, 3)])
def test_interleaved_is_megatrons(n, m, group):
    got = order.ops("interleaved", n, m, group=group)
    assert all(got[r] == _megatron_interleaved(n, m, r, n if group is None else group) for r in range(n))


@pytest.mark.parametrize("sched,n,m,msg", [
    ("dualpipe", 3, 6, "even number of pipeline ranks"),
    ("dualpipe", 4, 9, "even number of micro-batches"),
    ("dualpipe", 4, 6, "at least 2 x 4 = 8"),
    ("dualpipev", 4, 7, "at least 2 x 4 = 8"),
    ("1f1b", 4, 0, "positive integer"),
    ("interleaved", 4, 6, "m % group"),
    ("pipedream", 4, 8, "unknown schedule"),
])
def test_impossible_counts(sched, n, m, msg):
    with pytest.raises(order.OrderError, match=msg):
        order.ops(sched, n, m)


# ---- 4. tools/schedule.py ------------------------------------------------------------------------------
def _tool(*argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("schedule_tool", os.path.join(HERE, "..", "tools", "schedule.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tool.main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_tool_json_and_ops():
    code, out, _ = _tool("--schedule", "dualpipe", "--pp", "8", "--microbatches", "20",
                         "--f", "1", "--b", "1.5", "--w", "0.5", "--fb", "2.2", "--json", "--ops")
    doc = json.loads(out)
    assert code == 0
    assert doc["bubble"] == pytest.approx(3 * (2.2 + 1.5 - 1.5)) == doc["table2_bubble"]
    assert (doc["peak_activations"], doc["param_copies"]) == (9, 2)
    assert doc["ranks"] == order.ops("dualpipe", 8, 20)
    code, out, _ = _tool("--schedule", "dualpipev", "--pp", "4", "--microbatches", "10", "--ops")
    assert code == 0 and json.loads(out) == {"ranks": order.ops("dualpipev", 4, 10)}
    code, out, _ = _tool("--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--json")
    doc = json.loads(out)
    assert (doc["bubble"], doc["peak_activations"], doc["param_copies"]) == (9, 4, 1)


def test_tool_png(tmp_path):
    from PIL import Image

    path = tmp_path / "dp.png"
    code, out, _ = _tool("--schedule", "dualpipe", "--pp", "4", "--microbatches", "8", "--png", str(path))
    assert code == 0 and "bubble 2 (Table 2 formula: 2)" in out        # (4/2 - 1)(3 + 2 - 3)
    img = Image.open(path).convert("RGB")
    assert img.height > 4 * 22
    colours = set(img.getdata())
    palette = {"F": (252, 196, 120), "Bi": (170, 220, 170), "W": (210, 160, 230), "FB": (240, 120, 120)}
    for kind, rgb in palette.items():                          # each kind of cell is drawn
        assert rgb in colours, kind


@pytest.mark.parametrize("argv,flag", [
    (["--schedule", "dualpipe", "--pp", "3", "--microbatches", "8"], "--pp"),
    (["--schedule", "dualpipe", "--pp", "4", "--microbatches", "6"], "--microbatches"),
    (["--schedule", "dualpipev", "--pp", "4", "--microbatches", "7"], "--microbatches"),
    (["--schedule", "zb1p", "--pp", "4", "--microbatches", "8", "--w", "3"], "--w"),
])
def test_tool_errors_name_the_flag(argv, flag):
    code, _, err = _tool(*argv)
    assert code == 2 and flag in err, err
