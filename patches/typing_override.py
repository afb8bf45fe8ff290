"""typing_override: ``megatron.training.models.{gpt,hybrid}`` import ``typing.override`` (3.12+).

On Python 3.11 ``typing_extensions.override`` (the same no-op decorator) stands in. Nothing changes
on Python >= 3.12.
"""
from __future__ import annotations

import sys
import typing

from . import Patch


def _apply() -> None:
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


PATCH = Patch(
    "typing_override",
    "megatron.training imports typing.override, which Python 3.11 lacks",
    _apply,
    # Checked by text search in the test (importing these modules needs the patch first).
    {},
)
