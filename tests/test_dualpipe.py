"""DualPipe and DualPipeV in Megatron's training loop, on gloo ranks through the launcher.

Parity: four layouts, each against the no-pipelining run of the same tensor / expert parallelism
(Megatron-Core's own forward_backward_no_pipelining), both starting from one checkpoint (weights
only). A step batch-size schedule gives each run the micro-batch counts 2 PP, 2 PP + 2 and a larger
one in successive optimizer steps (DualPipeV: 2 N, 2 N + 2, larger):

    dualpipe  PP 2 x EP 2 (4 ranks, data-parallel 2)       alltoall dispatcher      M 4, 6, 8, 8
              with uneven stages: 5 layers on stage 0, 3 on stage 1 (--decoder-first/last-pipeline-num-layers)
    dualpipe  PP 4 x TP 2 (8 ranks, sequence parallel)      alltoall                 M 8, 10, 12, 12
    dualpipev N 2 x TP 2 (4 ranks, sequence parallel)       alltoall                 M 4, 6, 8, 8
    dualpipev N 4 x EP 2 (8 ranks, data-parallel 2)         node_limited             M 8, 10, 12, 12

Tiny DSv3 with 8 layers (MLA, 7 MoE layers with the expert bias, MTP depth 1), fp32. Every step:
the LM loss and grad norm within 1e-5 relative, every gradient tensor (global layer / expert names,
after the data-parallel reduction, before the optimizer) within 1e-5 relative, every expert bias
identical; DualPipe's mirrored copies and the MTP embedding copies hold exactly their originals'
gradients and biases. The operations each rank executed (recorded by the runtime from what ran)
equal ``tools/schedule.py --ops`` for the same PP and M. A DualPipe checkpoint resumes bit for bit and
loads under 1F1B (the next loss equals). Bad counts are refused at launch naming the flag.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from launch import ROOT, launch, metrics

DRIVER = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "dualpipe_driver.py")]

BASE = ["--cpu", "--dsv3-preset", "tiny", "--num-layers", "8", "--seq-length", "32", "--micro-batch-size", "1",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--clip-grad", "1.0", "--seed", "1234", "--moe-token-dispatcher-type", "alltoall", "--log-interval", "1",
        "--eval-iters", "0", "--eval-interval", "1000", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
        "--mock-data", "--split", "98,1,1", "--ckpt-format", "torch_dist", "--expert-tensor-parallel-size", "1"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
EP2 = ["--expert-model-parallel-size", "2"]
NODE_LIMITED = ["--moe-token-dispatcher-type", "node_limited", "--ranks-per-node", "1",
                "--moe-router-num-groups", "2", "--moe-router-group-topk", "2"]

#: name: (schedule, pipeline ranks, ranks, layout flags, step batch-size schedule (tokens:batch), M per step)
LAYOUTS = {
    "dualpipe_pp2_ep2": ("dualpipe", 2, 4, EP2, "0:8 256:12 640:16", [4, 6, 8, 8]),
    "dualpipe_pp4_tp2": ("dualpipe", 4, 8, TP2, "0:8 256:10 576:12", [8, 10, 12, 12]),
    "dualpipev_n2_tp2": ("dualpipev", 2, 4, TP2, "0:4 128:6 320:8", [4, 6, 8, 8]),
    "dualpipev_n4_ep2_node_limited": ("dualpipev", 4, 8, EP2 + NODE_LIMITED, "0:16 512:20 1152:24", [8, 10, 12, 12]),
}
STEPS = 4
#: flags of the pipelined run only: uneven stages (Megatron's --decoder-first/last-pipeline-num-layers)
PP_ONLY = {"dualpipe_pp2_ep2": ["--decoder-first-pipeline-num-layers", "5", "--decoder-last-pipeline-num-layers", "3"]}


def _run(nproc: int, out, args: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    code, log = launch(nproc, [str(out), *BASE, *args], entry=DRIVER, timeout=900)
    assert code == 0, f"run failed (exit {code}):\n{log[-6000:]}"


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """One checkpoint all parity runs start from (weights only, iteration reset by --finetune)."""
    root = tmp_path_factory.mktemp("dualpipe")
    _run(1, root / "init", ["--global-batch-size", "2", "--train-iters", "2", "--save", str(root / "ckpt"),
                            "--save-interval", "2"])
    return root


@pytest.fixture(scope="module", params=list(LAYOUTS))
def parity(request, start):
    schedule, pp, nproc, flags, batches, ms = LAYOUTS[request.param]
    common = [*flags, "--step-batch-size-schedule", batches, "--train-iters", str(STEPS),
              "--load", str(start / "ckpt"), "--finetune"]
    ref, run = start / f"{request.param}_ref", start / request.param
    _run(nproc // pp, ref, common + ["--pipeline-schedule", "nopipe-dump", "--metrics-jsonl", str(ref / "m.jsonl")])
    _run(nproc, run, common + PP_ONLY.get(request.param, []) + [
        "--pipeline-model-parallel-size", str(pp), "--pipeline-schedule", f"{schedule}-dump",
        "--metrics-jsonl", str(run / "m.jsonl")])
    return request.param, ref, run


def _grads(d, step: int) -> dict:
    """Merged over ranks: {"orig" | "copy" | "bias" | "copy_bias": {key: [tensors]}}."""
    out = {k: {} for k in ("orig", "copy", "bias", "copy_bias")}
    files = sorted(glob.glob(os.path.join(d, f"grads_r*_s{step}.pt")))
    assert files, f"no gradient dump for step {step} in {d}"
    for f in files:
        for kind, table in torch.load(f).items():
            for key, value in table.items():
                out[kind].setdefault(key, []).append(value)
    return out


def test_losses_gradients_and_biases_match_no_pipelining(parity):
    name, ref, run = parity
    _, pp, _, _, _, ms = LAYOUTS[name]
    want, got = metrics(str(ref / "m.jsonl")), metrics(str(run / "m.jsonl"))
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for it in want:
        for key in ("train/lm_loss", "train/grad_norm"):
            assert abs(got[it][key] - want[it][key]) <= 1e-5 * abs(want[it][key]), (name, it, key, got[it], want[it])
    seen = sorted({(rec["microbatches"], i) for i, rec in enumerate(_records(run, 0))})
    assert [m for m, _ in seen] == ms, f"{name}: micro-batches per step {seen}"
    for step in range(1, STEPS + 1):
        a, b = _grads(run, step), _grads(ref, step)
        assert set(a["orig"]) == set(b["orig"]), sorted(set(a["orig"]) ^ set(b["orig"]))[:5]
        for key, refs in b["orig"].items():
            r = refs[0]
            for g in a["orig"][key]:                     # every data-parallel replica
                err = float((g - r).norm() / r.norm().clamp(min=1e-30))
                assert err <= 1e-5, f"{name} step {step}: gradient of {key} off by {err:.2e} (relative)"
        assert set(a["bias"]) == set(b["bias"])
        assert len({k.split("|")[0] for k in b["bias"]}) == 8            # 7 MoE layers + MTP
        for key, refs in b["bias"].items():
            assert all(torch.equal(x, refs[0]) for x in a["bias"][key]), f"{name} step {step}: bias {key}"
        for key, copies in a["copy"].items():            # mirrored / MTP-embedding copies: exactly equal
            assert all(torch.equal(c, a["orig"][key][0]) for c in copies), f"{name} step {step}: copy {key}"
        for key, copies in a["copy_bias"].items():
            assert all(torch.equal(c, a["bias"][key][0]) for c in copies), f"{name} step {step}: copy bias {key}"
    copies = _grads(run, 1)["copy"]
    if name.startswith("dualpipe_"):
        assert len(copies) >= len(_grads(run, 1)["orig"]) // 2    # a second copy of every stage
    assert any(k.startswith("embedding.word_embeddings") for k in copies)   # the MTP embedding copy


def _records(d, rank: int) -> list[dict]:
    with open(os.path.join(d, f"trace_r{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


_TOOL: dict = {}


def _tool_ops(schedule: str, pp: int, m: int) -> list[list[str]]:
    if (schedule, pp, m) not in _TOOL:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "schedule.py"), "--schedule", schedule,
                              "--pp", str(pp), "--microbatches", str(m), "--ops"],
                             capture_output=True, text=True, check=True)
        _TOOL[(schedule, pp, m)] = json.loads(out.stdout)["ranks"]
    return _TOOL[(schedule, pp, m)]


def test_executed_operations_are_the_tools(parity):
    """Each rank's executed operations, per step, equal tools/schedule.py --ops for that PP and M."""
    name, _, run = parity
    schedule, pp, nproc, _, _, ms = LAYOUTS[name]
    for rank in range(nproc):
        records = _records(run, rank)
        assert [r["microbatches"] for r in records] == ms
        for rec in records:
            assert rec["schedule"] == schedule and rec["pp"] == pp
            assert rec["ops"] == _tool_ops(schedule, pp, rec["microbatches"])[rec["pp_rank"]], (name, rank)
            assert rec["peak_activation_bytes"] > 0 and 0 < rec["busy_s"] <= rec["step_s"]


def test_checkpoint_resumes_exactly_and_loads_under_1f1b(tmp_path):
    """DualPipe PP 2 saves at step 2 of 4; resumed from it (model, Adam, RNG, data position) steps 3-4
    are the same floats; 1F1B PP 2 loads its weights and computes the same step-3 loss."""
    common = ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4", "--train-iters", "4"]
    _run(2, tmp_path / "a", common + ["--pipeline-schedule", "dualpipe", "--save", str(tmp_path / "ckpt"),
                                      "--save-interval", "2", "--metrics-jsonl", str(tmp_path / "a.jsonl")])
    resume = tmp_path / "resume"
    shutil.copytree(tmp_path / "ckpt" / "iter_0000002", resume / "iter_0000002")
    (resume / "latest_checkpointed_iteration.txt").write_text("2")
    _run(2, tmp_path / "b", common + ["--pipeline-schedule", "dualpipe", "--load", str(resume),
                                      "--metrics-jsonl", str(tmp_path / "b.jsonl")])
    _run(2, tmp_path / "c", common + ["--load", str(resume), "--no-load-optim", "--no-load-rng",
                                      "--metrics-jsonl", str(tmp_path / "c.jsonl")])
    a, b, c = (metrics(str(tmp_path / f"{x}.jsonl")) for x in "abc")
    assert sorted(b) == sorted(c) == [3, 4]
    for it in (3, 4):
        assert b[it]["train/lm_loss"] == a[it]["train/lm_loss"] and b[it]["train/grad_norm"] == a[it]["train/grad_norm"]
    assert abs(c[3]["train/lm_loss"] - a[3]["train/lm_loss"]) <= 1e-5 * a[3]["train/lm_loss"]
    assert abs(c[3]["train/grad_norm"] - a[3]["train/grad_norm"]) <= 1e-5 * a[3]["train/grad_norm"]


# ---- launch refusals (no process group) ---------------------------------------------------------------


@pytest.mark.parametrize("world, extra, flag", [
    (3, ["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "3", "--num-layers", "6",
         "--global-batch-size", "6"], "--pipeline-model-parallel-size 3"),
    (4, ["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "4", "--global-batch-size", "9"],
     "--global-batch-size 9"),
    (4, ["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "4", "--global-batch-size", "6"],
     "--global-batch-size 6"),
    (8, ["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "4", "--global-batch-size", "14",
         "--expert-model-parallel-size", "2"], "--global-batch-size 14"),        # M = 14 / data-parallel 2 = 7
    (4, ["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "4", "--global-batch-size", "7"],
     "--global-batch-size 7"),
    (2, ["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "2", "--num-layers", "6",
         "--global-batch-size", "4"], "--num-layers 6"),
    (2, ["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "2",
         "--num-layers-per-virtual-pipeline-stage", "2"], "--num-layers-per-virtual-pipeline-stage"),
    (2, ["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "2",
         "--step-batch-size-schedule", "0:4 128:3"], "--step-batch-size-schedule"),
    (2, ["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "2", "--overlap-grad-reduce"],
     "--overlap-grad-reduce"),
])
def test_bad_counts_are_refused_naming_the_flag(no_process_groups, monkeypatch, world, extra, flag):
    from megatron_dsv3.training import launcher
    from megatron_dsv3.training.arguments import LaunchError

    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = [*BASE, "--train-iters", "2", *extra]
    if "--global-batch-size" not in extra and "--step-batch-size-schedule" not in extra:
        args += ["--global-batch-size", "8"]
    with pytest.raises(LaunchError) as info:
        launcher.prepare(args)
    assert flag in str(info.value.code), info.value.code


def test_good_counts_pass_the_launch_checks(no_process_groups, monkeypatch):
    from megatron_dsv3.training import launcher

    monkeypatch.setenv("WORLD_SIZE", "4")
    pp4 = ["--pipeline-model-parallel-size", "4"]
    for extra in (["--pipeline-schedule", "dualpipe", *pp4, "--global-batch-size", "8"],
                  ["--pipeline-schedule", "dualpipev", *pp4, "--global-batch-size", "9"],
                  ["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "2",
                   "--expert-model-parallel-size", "2", "--global-batch-size", "8"]):
        launcher.prepare([*BASE, "--train-iters", "2", *extra])


# ---- the weight-gradient store (one process) -------------------------------------------------------------
def test_split_backward_defers_weight_grads_exactly(cpu_world):
    """Bi + W later = the full backward, bit for bit, for Megatron's column / row parallel linears and a
    replicated linear, into Megatron DDP's main_grad; W runs first in first out; what it keeps alive
    is counted until it runs."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dsv3.model.mla import DuplicatedLinear
    from megatron_dsv3.parallel.schedules import wgrad

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True,
                            gradient_accumulation_fusion=False)
    x = torch.randn(4, 2, 8)

    def build():
        torch.manual_seed(0)
        layers = [DuplicatedLinear(8, 8, config=cfg, init_method=torch.nn.init.normal_),
                  ColumnParallelLinear(8, 16, config=cfg, init_method=torch.nn.init.normal_, bias=True,
                                       gather_output=False),
                  RowParallelLinear(16, 8, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                    input_is_parallel=True, skip_bias_add=True)]
        for layer in layers:
            for p in layer.parameters():
                p.main_grad = torch.zeros_like(p)          # as Megatron's DDP gives them
        return layers

    def step(layers, split: bool):
        if split:
            assert wgrad.enable(torch.nn.ModuleList(layers), replicated=(DuplicatedLinear,)) == 3
        for i in range(3):
            h = (x + i).requires_grad_()
            for layer in layers:
                h = torch.relu(layer(h)[0])
            if split:
                with wgrad.STORE.split(("c", i)):
                    h.sum().backward()
            else:
                h.sum().backward()
        for layer in layers:                                # DDP's hook: .grad into main_grad
            for p in layer.parameters():
                if p.grad is not None:
                    p.main_grad += p.grad
                    p.grad = None
        return [p.main_grad.clone() for layer in layers for p in layer.parameters()]

    full = step(build(), split=False)
    layers = build()
    step(layers, split=True)
    assert len(wgrad.STORE) == 3 and wgrad.STORE.held_bytes() > 0
    assert all(float(p.main_grad.abs().sum()) == 0 for layer in layers for p in layer.parameters()
               if p.dim() == 2)                              # no weight grad before its W
    assert [wgrad.STORE.run() for _ in range(3)] == [("c", 0), ("c", 1), ("c", 2)]
    assert wgrad.STORE.held_bytes() == 0
    got = [p.main_grad for layer in layers for p in layer.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(full, got))
