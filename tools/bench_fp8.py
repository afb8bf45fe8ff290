"""Relative loss error of emulated FP8 training against fp32, on the quickstart model (report sec. 3.3:
"the relative error of our FP8-trained model remains consistently below 0.25%" against BF16).

    .venv/bin/python tools/bench_fp8.py                     # the quickstart: 4 gloo ranks TP2 x PP2 x EP2, 100 steps
    .venv/bin/python tools/bench_fp8.py --nproc 1 --iters 20 --json      # short (what tests/test_fp8.py runs)

Trains the quickstart's tiny DeepSeek-V3 (examples/quickstart_cpu.sh: 4 layers, MLA, aux-loss-free MoE,
MTP, seq 128, batch 16, the generated corpus and BPE tokenizer) twice through the launcher from one
seed: once in fp32, once with ``--fp8-emulation`` (model/fp8_emulation.py: every linear GEMM of the
decoder, experts and MTP layer with e4m3 inputs, 1x128 activation tiles, 128x128 weight blocks, in
Fprop, Dgrad and Wgrad). Everything else is identical (data order, initial weights, dispatch), so the
difference is the recipe's quantisation. Prints the LM loss of both runs and the relative error
|L_fp8 - L_fp32| / L_fp32 per step, its mean over the run, its maximum, and its mean over the last
10% of the steps. The emulation keeps fp32 where the report keeps BF16/FP32 and accumulates in fp32;
the baseline here is fp32, not the report's BF16 (CPUs train in fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: examples/quickstart_cpu.sh's model and training flags (its TRAIN minus checkpoints / W&B / eval).
QUICKSTART_MODEL = ["--cpu", "--dsv3-preset", "tiny", "--num-layers", "4", "--seq-length", "128",
                    "--max-position-embeddings", "128", "--tokenizer-type", "HuggingFaceTokenizer"]
QUICKSTART_LAYOUT = {4: ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size",
                         "2", "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                         "--moe-token-dispatcher-type", "alltoall", "--ranks-per-node", "1"],
                     1: ["--moe-token-dispatcher-type", "alltoall"]}


def quickstart_train(iters: int) -> list[str]:
    return ["--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", str(iters), "--lr", "3e-3",
            "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(10, iters - 1)),
            "--clip-grad", "1.0", "--weight-decay", "0.1", "--seed", "1234",
            "--moe-router-bias-update-schedule", f"0:0.001,{iters * 16 * 128 * 9 // 10}:0",
            "--split", "98,2,0", "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "10"]


def ensure_data(directory: str) -> str:
    """The quickstart corpus / tokenizer / dataset (generated here, nothing downloaded)."""
    if not os.path.exists(os.path.join(directory, "quickstart_text_document.idx")):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_quickstart_data.py"), "--out",
                              directory], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"bench_fp8: making the quickstart data failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return directory


def run(nproc: int, iters: int, data: str, metrics: str, fp8: bool, port: int) -> None:
    argv = (QUICKSTART_MODEL + ["--tokenizer-model", os.path.join(data, "tokenizer"), "--data-path",
                                os.path.join(data, "quickstart_text_document")]
            + QUICKSTART_LAYOUT[nproc] + quickstart_train(iters) + ["--metrics-jsonl", metrics]
            + (["--fp8-emulation"] if fp8 else []))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           "-m", "megatron_dsv3.pretrain", *argv]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench_fp8: the {'FP8' if fp8 else 'fp32'} run failed (exit {out.returncode}):\n"
                         f"{(out.stdout + out.stderr)[-6000:]}")


def losses(path: str) -> dict[int, float]:
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["iteration"]] = rec["train/lm_loss"]
    return out


def compare(fp32: dict[int, float], fp8: dict[int, float]) -> dict:
    """Per-step relative error of the FP8 run's LM loss and its summaries."""
    steps = sorted(set(fp32) & set(fp8))
    if not steps:
        raise SystemExit("bench_fp8: the two runs logged no common iteration")
    rel = [abs(fp8[i] - fp32[i]) / abs(fp32[i]) for i in steps]
    tail = rel[-max(1, len(rel) // 10):]
    return {"steps": steps, "loss_fp32": [fp32[i] for i in steps], "loss_fp8": [fp8[i] for i in steps],
            "rel_error": rel, "mean_rel_error": sum(rel) / len(rel), "max_rel_error": max(rel),
            "final_rel_error": sum(tail) / len(tail)}


def main(argv=None) -> dict:
    from megatron_dsv3.parallel.world import free_port

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4, choices=sorted(QUICKSTART_LAYOUT),
                    help="4: the quickstart's TP2 x PP2 x EP2 on gloo ranks; 1: one rank (CI)")
    ap.add_argument("--iters", type=int, default=100, help="training steps per run (quickstart: 100)")
    ap.add_argument("--data", default=None, help="quickstart data directory (default: generated in --out)")
    ap.add_argument("--out", default=None, help="where the metrics and data go (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    if a.iters < 2:
        ap.error("--iters must be >= 2")
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or tmp
        os.makedirs(out, exist_ok=True)
        data = ensure_data(a.data or os.path.join(out, "data"))
        paths = {}
        for name, fp8 in (("fp32", False), ("fp8", True)):
            paths[name] = os.path.join(out, f"metrics_{name}.jsonl")
            if os.path.exists(paths[name]):
                os.remove(paths[name])
            run(a.nproc, a.iters, data, paths[name], fp8, free_port())
        result = compare(losses(paths["fp32"]), losses(paths["fp8"]))
    result.update(nproc=a.nproc, iters=a.iters)
    if a.json:
        print(json.dumps(result))
        return result
    layout = "TP2 x PP2 x EP2 (SP) on 4 gloo ranks" if a.nproc == 4 else "1 rank"
    print(f"quickstart model, {a.iters} steps, {layout}, same seed; LM loss fp32 vs emulated FP8 (e4m3, 1x128 / "
          "128x128, Fprop + Dgrad + Wgrad)")
    print(f"{'step':>6} {'fp32':>9} {'fp8':>9} {'rel. error':>11}")
    every = max(1, len(result["steps"]) // 10)
    for k, step in enumerate(result["steps"]):
        if k % every == 0 or k == len(result["steps"]) - 1:
            print(f"{step:>6} {result['loss_fp32'][k]:>9.4f} {result['loss_fp8'][k]:>9.4f} "
                  f"{100 * result['rel_error'][k]:>10.3f}%")
    print(f"relative loss error: mean {100 * result['mean_rel_error']:.3f}%, max {100 * result['max_rel_error']:.3f}%, "
          f"last 10% of steps {100 * result['final_rel_error']:.3f}% (report: below 0.25% vs BF16)")
    return result


if __name__ == "__main__":
    main()
