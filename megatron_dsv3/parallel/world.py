"""Process-group set-up shared by the HF API, tests, examples and tools (not used by model code):
a gloo world on localhost, Megatron's model-parallel groups on it, and a spawn helper for CPU worlds."""
from __future__ import annotations

import os
import random
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def free_port() -> int:
    """A localhost TCP port nothing listens on, drawn below the kernel's ephemeral range: ports from
    that range also go to outgoing connections (a gloo world opens many), so one picked there can be
    taken before the rendezvous binds it (EADDRINUSE). Falls back to a kernel-chosen port."""
    low = _ephemeral_low()
    draw = random.SystemRandom()             # independent of any random.seed() in the caller
    for _ in range(64 if low > 11000 else 0):
        port = draw.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def init_world(rank: int = 0, world_size: int = 1, port: int | None = None, backend: str = "gloo"):
    """torch.distributed on localhost (a no-op when a process group already exists)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port or free_port()))
    dist.init_process_group(backend, rank=rank, world_size=world_size)


def destroy_model_parallel() -> None:
    """Megatron's ``destroy_model_parallel`` forgets its groups but leaves them alive: every gloo group
    keeps its threads (Megatron builds ~100 groups per initialisation; re-initialising a few times in
    one 8-rank world on 2 cores left ~600 threads per rank and made the world 5x slower). Destroy
    every group but the default one as well (also groups created outside Megatron, such as the
    node-limited dispatcher's node groups: they belong to the old layout); models built on the old
    groups must not be used after."""
    from torch.distributed import distributed_c10d as c10d

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        for group in list(c10d._world.pg_map):
            if group is not c10d.GroupMember.WORLD:
                dist.destroy_process_group(group)


def init_model_parallel(tp: int = 1, ep: int = 1, pp: int = 1, etp: int = 1, seed: int = 1234):
    """(Re)build Megatron's model-parallel groups on the current world and seed its RNG tracker.
    Re-initialising first destroys every process group but the default one (destroy_model_parallel)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    torch.manual_seed(seed)


def _spawned(rank: int, world_size: int, port: int, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHDYNAMO_DISABLE="1",
                      OMP_NUM_THREADS="1", MEGATRON_DSV3_CPU="1")
    torch.set_num_threads(1)
    from ..compat import cpu_backend

    cpu_backend.enable()
    init_world(rank, world_size, port)
    fn(rank, *args)
    dist.barrier()
    dist.destroy_process_group()


def run_cpu_world(world_size: int, fn, *args) -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned CPU/gloo ranks with the CPU backend on.

    ``fn`` must be importable (module level). A rank's exception is re-raised here.
    """
    import torch.multiprocessing as mp

    mp.start_processes(_spawned, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="spawn")


_TOLD = []


def ensure_world() -> None:
    """A single-process world with Megatron's model-parallel state when none exists (the caller's
    parallel state otherwise). Without CUDA (or with ``MEGATRON_DSV3_CPU=1``) this turns the CPU
    backend on for the process and says so once on stderr."""
    import sys

    from ..compat import cpu_backend

    if (not torch.cuda.is_available() or cpu_backend.requested()) and not cpu_backend.is_enabled():
        cpu_backend.enable()
        if not _TOLD and not cpu_backend.requested():
            _TOLD.append(True)
            print("[megatron-dsv3] no CUDA device: turned on the CPU backend for this process "
                  "(megatron_dsv3.cpu_backend.disable() turns it off; MEGATRON_DSV3_CPU=1 asks for it "
                  "without this note)", file=sys.stderr, flush=True)
    if not dist.is_initialized():
        init_world(0, 1)
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel()
