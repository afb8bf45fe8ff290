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
           popen: bool = False, entry: list[str] | None = None, torchrun: bool = False):
    """Run the launcher (or ``entry``: a script and its leading arguments) on ``nproc`` ranks: forked
    from the pre-imported tests/zygote.py with torchrun's variables, or under torchrun itself with
    ``torchrun=True`` or ``popen=True`` (tests of process trees, signals and exit codes)."""
    target = [*(entry or ["-m", "megatron_dsv3.pretrain"]), *args]
    full_env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
                    PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    if not (torchrun or popen):
        return _zygote_launch(nproc, target, full_env, timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), *target]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


_ZYGOTE: list = []


def _zygote_launch(nproc: int, target: list[str], env: dict, timeout: int):
    import atexit
    import tempfile

    if not _ZYGOTE or _ZYGOTE[0].poll() is not None:
        zenv = {k: v for k, v in os.environ.items() if k != "MEGATRON_DSV3_CPU"}
        zenv.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "zygote.py")],
                                cwd=ROOT, env=zenv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = proc.stdout.readline()
        assert ready.startswith('{"ready"'), f"tests/zygote.py did not start: {ready!r}"
        atexit.register(proc.kill)
        _ZYGOTE[:] = [proc]
    proc = _ZYGOTE[0]
    fd, log = tempfile.mkstemp(prefix="dsv3-launch-", suffix=".log")
    os.close(fd)
    req = {"nproc": nproc, "target": target, "cwd": ROOT, "timeout": timeout, "log": log,
           "env": dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))}
    proc.stdin.write(json.dumps(req) + "\n")
    proc.stdin.flush()
    reply = json.loads(proc.stdout.readline())
    with open(log) as f:
        text = f.read()
    os.unlink(log)
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(target, timeout, output=text)
    return reply["code"], text


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
