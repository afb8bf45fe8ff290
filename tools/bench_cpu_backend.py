"""What the CPU backend's interception costs: the launcher's training iteration (world size 1, the
quickstart's tiny DSv3, mock data) with the CPU backend as it is (patched call sites only), and with a
global TorchFunctionMode that rewrites CUDA devices on every torch call (how the backend worked before:
the mode is re-created here, entered before training). Runs are interleaved; prints a table and JSON.

    .venv/bin/python tools/bench_cpu_backend.py --iters 30 --rounds 3 [--json out.json]
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

MODEL = ["--cpu", "--dsv3-preset", "tiny", "--num-layers", "4", "--seq-length", "128",
         "--micro-batch-size", "4", "--global-batch-size", "16", "--lr", "3e-3", "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "767", "--split", "98,1,1",
         "--eval-iters", "0", "--eval-interval", "100000", "--log-interval", "1",
         "--moe-token-dispatcher-type", "alltoall", "--seed", "1234"]

DRIVER = r'''
import sys, torch
from torch.overrides import TorchFunctionMode

class GlobalCudaToCpu(TorchFunctionMode):
    """Every torch call passes through here (the former global interception)."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        dev = kwargs.get("device")
        if isinstance(dev, (int, str, torch.device)) and not isinstance(dev, bool) and \
                str(dev).startswith("cuda"):
            kwargs["device"] = torch.device("cpu")
        return func(*args, **kwargs)

if sys.argv.pop(1) == "global":
    GlobalCudaToCpu().__enter__()
from megatron_dsv3.training.launcher import main
main(sys.argv[1:])
'''


def run(mode: str, iters: int, tmp: str) -> float:
    out = os.path.join(tmp, f"{mode}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + (mode == "global")))
    cmd = [sys.executable, "-c", DRIVER, mode, *MODEL, "--train-iters", str(iters), "--metrics-jsonl", out]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    times = [json.loads(line).get("perf/iteration_time_s") for line in open(out)]
    steady = [t for t in times[5:] if t]
    return statistics.median(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    results = {"patched_call_sites": [], "global_mode": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode, key in (("plain", "patched_call_sites"), ("global", "global_mode")):
                results[key].append(run(mode, args.iters, tmp))
                print(f"round {r + 1}/{args.rounds} {key}: {results[key][-1] * 1e3:.1f} ms/iteration",
                      flush=True)
    ours, old = statistics.median(results["patched_call_sites"]), statistics.median(results["global_mode"])
    summary = {"iteration_ms_patched_call_sites": ours * 1e3, "iteration_ms_global_mode": old * 1e3,
               "saving": 1 - ours / old, "rounds": results}
    print(f"\n{'CPU backend':<32} {'ms / iteration (median)':>24}")
    print(f"{'patched call sites (now)':<32} {ours * 1e3:>24.1f}")
    print(f"{'global TorchFunctionMode':<32} {old * 1e3:>24.1f}")
    print(f"{'saving':<32} {100 * summary['saving']:>23.1f}%")
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
