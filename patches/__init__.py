"""Changes megatron-dsv3 makes to Megatron-Core / megatron.training where no extension point exists.

Installed as ``megatron_dsv3.patches`` (pyproject maps this directory). Each patch is a small named
unit (:class:`Patch`): what it changes and why, the Megatron-Core version it was written against, and
a fingerprint (sha1 of the source) of every Megatron object it replaces or relies on.
``tests/test_patches.py`` checks every fingerprint, so a Megatron upgrade that moves the ground under
a patch fails loudly instead of running unpatched or mis-patched code.

Training patches (applied by the launcher, ``megatron_dsv3.pretrain``; any device):

- ``typing_override``   ``import megatron.training`` uses ``typing.override`` (Python >= 3.12) on 3.11.
- ``dataset_helpers``   Megatron runs ``make`` on its dataset helpers at start-up; the wheel ships them
                        compiled and without a Makefile, so start-up fails on every wheel install.
- ``training_log_hook`` calls megatron-dsv3's metrics (W&B / console) after each ``training_log``.
- ``reparse_args``      Megatron's own later re-parses of ``sys.argv`` (fault tolerance, in-process
                        restart) include the launcher's flags, so registered dispatcher names parse.
- ``pipeline_schedule`` rebinds the train loop's forward-backward function to the schedule chosen
                        with ``--pipeline-schedule`` (only for a schedule registered by megatron-dsv3).

The CPU-only patches live in ``megatron_dsv3/cpu_backend.py`` (same :class:`Patch` type).
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

MEGATRON_CORE_VERSION = "0.19.2"


@dataclass
class Patch:
    """One named change. ``targets`` maps 'module:qualname' to the sha1 (first 12 hex) of its source."""

    name: str
    why: str
    apply: Callable[[], None]
    targets: dict[str, str] = field(default_factory=dict)
    megatron_version: str = MEGATRON_CORE_VERSION
    applied: bool = False


_ORIGINALS: dict[str, object] = {}


def resolve(target: str):
    """The object named 'module:qualname' (before any patch replaced it)."""
    if target in _ORIGINALS:
        return _ORIGINALS[target]
    mod_name, _, qual = target.partition(":")
    obj = __import__(mod_name, fromlist=["_"])
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def source_fingerprint(target: str) -> str:
    """sha1 of the source of ``module:qualname`` as shipped (first 12 hex digits)."""
    return hashlib.sha1(inspect.getsource(resolve(target)).encode()).hexdigest()[:12]


def apply(patches: list[Patch]) -> None:
    """Apply each patch once, remembering the originals of its targets."""
    for patch in patches:
        if patch.applied:
            continue
        for target in patch.targets:
            _ORIGINALS.setdefault(target, resolve(target))
        patch.apply()
        patch.applied = True


def check_fingerprints(patches: list[Patch]) -> dict[str, tuple[str, str]]:
    """Targets whose source differs from the pinned version: {target: (expected, found)}."""
    bad = {}
    for patch in patches:
        for target, expected in patch.targets.items():
            found = source_fingerprint(target)
            if found != expected:
                bad[target] = (expected, found)
    return bad


def training_patches() -> list[Patch]:
    """The launcher's patches, in the order they must be applied."""
    from . import dataset_helpers, reparse_args, training_log_hook, typing_override

    return [typing_override.PATCH, dataset_helpers.PATCH, training_log_hook.PATCH, reparse_args.PATCH]


def all_patches() -> list[Patch]:
    """Every patch in this directory (``pipeline_schedule`` is applied only on demand)."""
    from . import pipeline_schedule

    return training_patches() + [pipeline_schedule.PATCH]
