"""One spawn helper for multi-rank gloo tests: free port, CPU backend, exceptions propagate."""
from __future__ import annotations

import os

import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, port: int, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHDYNAMO_DISABLE="1",
                      OMP_NUM_THREADS="1", MEGATRON_DSV3_CPU="1")
    import torch

    torch.set_num_threads(1)
    from megatron_dsv3 import cpu_backend
    from megatron_dsv3.parallel import init_world

    cpu_backend.enable()
    init_world(rank, world_size, port)
    fn(rank, *args)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def run_world(world_size: int, fn, *args) -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned gloo ranks; re-raises a rank's exception."""
    from megatron_dsv3.parallel import free_port

    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="spawn")
