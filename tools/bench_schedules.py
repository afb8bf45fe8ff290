"""1F1B, DualPipe and DualPipeV on the same ranks at equal global batch: step time, each rank's busy and
idle time from its recorded timeline next to the simulator's bubble, and the peak of live activation
bytes per rank.

    .venv/bin/python tools/bench_schedules.py                      # 4 gloo ranks, CPU (PP 4)
    .venv/bin/python tools/bench_schedules.py --json out.json --steps 6 --global-batch 16

The ranks are gloo/CPU processes (the CPU backend); ``tools/gpu_check.sh`` runs the same on the
device machine's 16 cores (CUDA hidden), where the 4 ranks do not share 2 cores.

Each schedule trains the same tiny DSv3 (``--layers`` layers, MTP, MoE) through the launcher for
``--steps`` iterations with PP = ranks (DualPipeV: its V of 2 x ranks stages), one micro-batch size and
global batch, so every schedule runs the same micro-batches. Per rank the runtime records when each
operation computed (receives excluded): busy = the sum, idle = step time - busy (the first
``--warmup`` steps are dropped). Megatron-Core's own 1F1B is timed by wrapping its forward_step /
backward_step. The simulator's bubble is given in units of F (F=1, B=2, W=1, F&B=F+B) and with the
mean measured durations of each kind of operation. Live activation bytes: tensors autograd saved for
backwards still to run (+ inputs kept for deferred weight grads), peak over the step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCHEDULES = ("1f1b", "dualpipe", "dualpipev")


# ------------------------------------------------------------------------------------------------
# rank side: python tools/bench_schedules.py --rank-main OUT <launcher args>
# ------------------------------------------------------------------------------------------------
def rank_main(out: str, argv: list[str]) -> None:
    import torch

    from megatron_dsv3 import registry
    from megatron_dsv3.compat.patches import apply, typing_override
    from megatron_dsv3.training import launcher

    apply([typing_override.PATCH])
    from megatron.core.pipeline_parallel import get_forward_backward_func, schedules

    from megatron_dsv3.parallel.schedules import trace

    def sink(record):
        with open(os.path.join(out, f"trace_r{torch.distributed.get_rank()}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    trace.SINKS.append(sink)
    state = {}
    forward_step, backward_step = schedules.forward_step, schedules.backward_step

    def timed_forward(*args, **kwargs):
        rec, m = state["rec"], kwargs.get("current_microbatch")
        model = args[2]
        exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        start = rec.now()
        with rec.saving(m, exclude):
            out = forward_step(*args, **kwargs)
        rec.done(f"F0:{m}", start, rec.now())
        state["fifo"].append(m)
        return out

    def timed_backward(*args, **kwargs):
        rec, m = state["rec"], state["fifo"].pop(0)
        start = rec.now()
        out = backward_step(*args, **kwargs)
        rec.release(m)
        rec.done(f"B0:{m}", start, rec.now())
        return out

    @registry.register(registry.SCHEDULES, "1f1b-timed")
    def one_f_one_b(*args, **kwargs):
        inner = get_forward_backward_func(*args, **kwargs)

        def run(**kw):
            from megatron.core import parallel_state as ps

            pp = ps.get_pipeline_model_parallel_group()
            state["rec"], state["fifo"] = trace.Recorder("1f1b", pp.rank(), pp.size(), kw["num_microbatches"]), []
            schedules.forward_step, schedules.backward_step = timed_forward, timed_backward
            try:
                losses = inner(**kw)
            finally:
                schedules.forward_step, schedules.backward_step = forward_step, backward_step
            state["rec"].publish(forward_only=kw.get("forward_only", False))
            return losses

        return run

    launcher.main(argv)


# ------------------------------------------------------------------------------------------------
# driver side
# ------------------------------------------------------------------------------------------------
def launch(schedule: str, a, out: str) -> None:
    from megatron_dsv3.parallel.world import free_port

    model = ["--dsv3-preset", "tiny", "--num-layers", str(a.layers), "--seq-length", str(a.seq),
             "--micro-batch-size", "1", "--global-batch-size", str(a.global_batch), "--train-iters", str(a.steps),
             "--lr", "1e-3", "--seed", "1234", "--moe-token-dispatcher-type", "alltoall", "--log-interval", "1000",
             "--eval-iters", "0", "--eval-interval", "100000", "--tokenizer-type", "NullTokenizer",
             "--vocab-size", "255", "--mock-data", "--split", "98,1,1", "--pipeline-model-parallel-size", str(a.ranks),
             "--pipeline-schedule", "1f1b-timed" if schedule == "1f1b" else schedule]
    model += ["--cpu"]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks), "--master-port",
           str(free_port()), os.path.abspath(__file__), "--rank-main", out, *model]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    if done.returncode:
        raise SystemExit(f"{schedule} run failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")


def summarise(schedule: str, a, out: str) -> dict:
    from megatron_dsv3.parallel.schedules.order import parse
    from megatron_dsv3.parallel.schedules.simulate import simulate

    per_rank = {}
    for r in range(a.ranks):
        with open(os.path.join(out, f"trace_r{r}.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        records = [x for x in records if not x.get("forward_only")][a.warmup:]
        per_rank[records[0]["pp_rank"]] = records
    steps = [max(per_rank[r][i]["step_s"] for r in per_rank) for i in range(len(per_rank[0]))]
    kinds: dict = {}
    for records in per_rank.values():
        for rec in records:
            for op, start, end in rec["timeline"]:
                parts = parse(op)
                kinds.setdefault("FB" if len(parts) == 2 else parts[0].kind, []).append(end - start)
    mean = {k: statistics.mean(v) for k, v in kinds.items()}
    m = per_rank[0][0]["microbatches"]
    f = mean["F"]
    b = mean.get("B", mean.get("Bi", 2 * f) + mean.get("W", 0.0))
    w = mean.get("W", 0.0)
    fb = mean.get("FB", f + b)
    units = simulate(schedule, a.ranks, m)
    timed = simulate(schedule, a.ranks, m, f, b, min(w, b), fb)
    ranks = []
    for r in sorted(per_rank):
        recs = per_rank[r]
        ranks.append(dict(rank=r, busy_ms=1e3 * statistics.mean(x["busy_s"] for x in recs),
                          idle_ms=1e3 * statistics.mean(x["idle_s"] for x in recs),
                          wait_ms=1e3 * statistics.mean(x["wait_s"] for x in recs),
                          peak_activation_mb=max(x["peak_activation_bytes"] for x in recs) / 2**20))
    return dict(schedule=schedule, ranks=a.ranks, microbatches=m, step_ms=1e3 * statistics.mean(steps),
                op_ms={k: 1e3 * v for k, v in mean.items()}, per_rank=ranks,
                max_idle_ms=max(x["idle_ms"] for x in ranks),
                sim_bubble_units=units["bubble"], sim_peak_activations=units["peak_activations"],
                sim_bubble_ms_from_measured_ops=1e3 * timed["bubble"],
                sim_makespan_ms_from_measured_ops=1e3 * timed["makespan"])


def table(rows: list[dict]) -> str:
    lines = ["| schedule | step (ms) | per rank busy / idle (ms) | max idle (ms) | simulated bubble: units of F "
             "/ with measured op times (ms) | peak live activations per rank (MiB) |",
             "|---|---|---|---|---|---|"]
    for x in rows:
        ranks = ", ".join(f"{r['busy_ms']:.0f}/{r['idle_ms']:.0f}" for r in x["per_rank"])
        acts = ", ".join(f"{r['peak_activation_mb']:.2f}" for r in x["per_rank"])
        lines.append(f"| {x['schedule']} (M={x['microbatches']}) | {x['step_ms']:.0f} | {ranks} | "
                     f"{x['max_idle_ms']:.0f} | {x['sim_bubble_units']:g} / {x['sim_bubble_ms_from_measured_ops']:.0f} "
                     f"| {acts} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--rank-main":
        rank_main(argv[1], argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4, help="pipeline ranks (even; default 4)")
    p.add_argument("--global-batch", type=int, default=16, help="micro-batches per step (micro-batch size 1)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (a multiple of 2 x ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="steps dropped from the averages")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    rows = []
    for schedule in a.schedules:
        with tempfile.TemporaryDirectory() as out:
            launch(schedule, a, out)
            rows.append(summarise(schedule, a, out))
        print(f"{schedule}: step {rows[-1]['step_ms']:.0f} ms", flush=True)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
