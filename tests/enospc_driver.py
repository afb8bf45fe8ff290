"""The launcher on a disk that fills up while one checkpoint is written, for tests/test_reliability.py:

    torchrun tests/enospc_driver.py ITERATION <launcher args>

Every file of iteration ITERATION's checkpoint that dist_checkpointing's writer opens accepts its
first 64 KiB and then raises OSError(ENOSPC), as a full filesystem does. Other checkpoints are
written normally.
"""
import builtins
import errno
import os
import sys

from megatron_dsv3.compat.patches import apply, typing_override
from megatron_dsv3.training import launcher

apply([typing_override.PATCH])
from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: E402

_ROOM = 64 << 10


class _FullDisk:
    """A file object whose writes fail with ENOSPC once ``_ROOM`` bytes are written."""

    def __init__(self, f, path):
        self._f, self._path, self._written = f, path, 0

    def write(self, data):
        size = len(memoryview(data).cast("B"))
        if self._written + size > _ROOM:
            self._f.write(memoryview(data).cast("B")[: max(_ROOM - self._written, 0)])
            self._written = _ROOM
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        self._written += size
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


def _install(iteration: int) -> None:
    marker = f"iter_{iteration:07d}"

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        if marker in str(file) and ("w" in mode or "a" in mode):
            print(f"DSV3_TEST: disk full while writing {file}", flush=True)
            return _FullDisk(f, str(file))
        return f

    filesystem_async.open = full_disk_open     # the writer's `open` (a module global shadowing the builtin)


if __name__ == "__main__":   # dist_checkpointing starts a spawn-context Manager, which re-imports us
    _install(int(sys.argv.pop(1)))
    launcher.main()
