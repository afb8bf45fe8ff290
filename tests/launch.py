"""Run the dsv3-pretrain launcher as a user would (torchrun, CPU backend), for the training tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron_dsv3.parallel.world import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: A tiny DSv3 (MLA + aux-free MoE + MTP), 4 layers so that PP2 splits it evenly.
TINY = ["--cpu", "--dsv3-preset", "tiny", "--num-layers", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--clip-grad", "1.0", "--seed", "1234",
        "--moe-token-dispatcher-type", "alltoall", "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", "1000", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
        "--mock-data", "--split", "98,1,1", "--ckpt-format", "torch_dist"]

LAYOUTS = {
    "world1": (1, []),
    "tp2ep2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                   "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"]),
    "pp2ep2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                   "--expert-tensor-parallel-size", "1"]),
    "pp2vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
}


def launch(nproc: int, args: list[str], *, timeout: int = 420, env: dict | None = None,
           popen: bool = False, entry: list[str] | None = None):
    """torchrun the launcher (or ``entry``: a script and its leading arguments) on ``nproc`` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), *(entry or ["-m", "megatron_dsv3.pretrain"]), *args]
    full_env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
                    PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def run_ok(nproc: int, args: list[str], **kw) -> str:
    """``launch`` that must succeed; returns the log."""
    code, log = launch(nproc, args, **kw)
    assert code == 0, f"launcher failed (exit {code}):\n{log[-6000:]}"
    return log


def metrics(path: str) -> dict[int, dict]:
    """{iteration: scalars} from a --metrics-jsonl file (the last record of an iteration wins)."""
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["iteration"]] = rec
    return out
