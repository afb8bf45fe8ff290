"""typing_override: ``megatron.training.models.{gpt,hybrid}`` import ``typing.override`` (3.12+).

On Python 3.11 ``typing_extensions.override`` (the same no-op decorator) stands in. Nothing changes
on Python >= 3.12. The fingerprints pin the two importing modules by file (they cannot be imported to
hash their functions before this patch is in place).
"""
from __future__ import annotations

import sys
import typing

from . import Patch


def _install(patch: Patch) -> None:
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        patch.set(typing, "override", typing_extensions.override)


PATCH = Patch(
    "typing_override",
    "megatron.training imports typing.override, which Python 3.11 lacks",
    _install,
    {"file:megatron/training/models/gpt.py": "cb64051ce69a",
     "file:megatron/training/models/hybrid.py": "ad0fdcfb1370"},
)
