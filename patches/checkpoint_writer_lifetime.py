"""checkpoint_writer_lifetime: the checkpoint writer's helper process dies with its rank.

On its first save, ``dist_checkpointing``'s file writer starts a spawn-context
``multiprocessing.Manager`` (a server process of ~400 MB holding the write-results queue; its start
also starts a ``multiprocessing`` resource tracker). When the rank is killed (SIGKILL, OOM killer,
a crashed peer), torchrun only signals the ranks still alive, so the server and the tracker (which
exits once every holder of its pipe is gone) outlive the job for minutes, holding its log open.

The patch starts the same Manager with an initializer that asks Linux to SIGKILL the server when its
parent (the rank) dies (``prctl(PR_SET_PDEATHSIG)``), and exits at once if the rank is already gone.
Elsewhere than Linux the initializer does nothing.
"""
from __future__ import annotations

import os
import signal

from . import Patch, resolve

TARGET = "megatron.core.dist_checkpointing.strategies.filesystem_async:get_write_results_queue"
_PR_SET_PDEATHSIG = 1

#: The running Manager (kept referenced for the life of the rank, as the original's queue keeps it).
MANAGER: list = [None]


def die_with_parent(parent_pid: int) -> None:
    """Manager server initializer (runs in the spawned server process)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:   # the rank died before prctl took effect
        os._exit(1)


def _install(patch: Patch) -> None:
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing as mp

    resolve(TARGET)

    def get_write_results_queue(mp_mode: str = "spawn"):
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=mp.get_context(mp_mode))
            manager.start(die_with_parent, (os.getpid(),))
            MANAGER[0] = manager
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    patch.set(filesystem_async, "get_write_results_queue", get_write_results_queue)


PATCH = Patch(
    "checkpoint_writer_lifetime",
    "the checkpoint writer's multiprocessing Manager (and its resource tracker) outlive a killed rank",
    _install,
    {TARGET: "46b5e470de19",
     "megatron.core.dist_checkpointing.strategies.filesystem_async:FileSystemWriterAsync.prepare_write_data":
         "3ac379f04741"},
)
