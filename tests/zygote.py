"""A pre-imported parent that forks the ranks of a test launch (tests/launch.py).

Starting a rank of the launcher costs ~8.6 s of CPU, ~5 s of it importing torch and Megatron-Core;
the test suite starts ~150 ranks on 2 cores. This process imports them once and forks each rank
from itself with the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), like torchrun stops the other ranks when one fails, and reports every
rank's exit code and output. Nothing is initialised here before the fork: no process group, no
tensor op (so no thread pool), no CPU-backend patch. Tests that check process trees, signals or
torchrun's own behaviour launch with torchrun (``launch(..., torchrun=True)``).

Protocol (stdin/stdout, one JSON object per line): {"nproc", "target", "env", "cwd", "timeout",
"log"} -> {"code", "timed_out"}; the ranks' output is written to ``log`` (rank 0 first).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time


def _preimport() -> None:
    import torch  # noqa: F401
    import megatron.core  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron_dsv3.training.launcher  # noqa: F401


def _rank(target: list[str], env: dict, cwd: str, out_fd: int) -> None:
    """In the forked child: become ``python <target...>`` for one rank (never returns)."""
    import runpy

    import atexit

    # exit handlers registered by the pre-imports belong to the parent (e.g. wandb's media temp
    # directory, created at import and shared by every forked rank): a rank runs only its own
    atexit._clear()
    code = 1
    try:
        os.setpgid(0, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
            runpy.run_path(target[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()           # what a normal interpreter exit runs (W&B, writers)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run(req: dict) -> dict:
    nproc, logs, pids = req["nproc"], [], {}
    for rank in range(nproc):
        path = f"{req['log']}.rank{rank}"
        logs.append(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        env = dict(req["env"], RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc))
        pid = os.fork()
        if pid == 0:
            _rank(req["target"], env, req["cwd"], fd)
        os.close(fd)
        pids[pid] = rank
    codes: dict[int, int] = {}
    deadline, stop_at, timed_out = time.time() + req["timeout"], None, False
    while len(codes) < nproc:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[pids[pid]] = os.waitstatus_to_exitcode(status)
            if codes[pids[pid]] != 0 and stop_at is None:
                stop_at = time.time() + 5          # torchrun: a failed rank ends the others
            continue
        now = time.time()
        if now > deadline:
            timed_out = True
        if timed_out or (stop_at is not None and now > stop_at):
            for p, r in pids.items():
                if r not in codes:
                    try:
                        os.killpg(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        time.sleep(0.05)
    with open(req["log"], "w") as out:
        for path in logs:
            with open(path) as f:
                out.write(f.read())
            os.unlink(path)
    bad = [c for r, c in sorted(codes.items()) if c != 0]
    return {"code": bad[0] if bad else 0, "timed_out": timed_out}


def main() -> None:
    _preimport()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
