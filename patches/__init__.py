"""Changes megatron-dsv3 makes to Megatron-Core / megatron.training where no extension point exists.

This directory is the place to read them; the package imports it as ``megatron_dsv3.compat.patches``
(``megatron_dsv3/compat/patches`` is a link to it, so a source checkout imports it as an install does).
Each patch is a small named unit (:class:`Patch`): what it changes and why, the Megatron-Core version
it was written against, and a fingerprint (sha1 of the source) of every Megatron function it replaces
or relies on: the replaced functions, their callers on the paths our runs take, and the code whose
behaviour the patch assumes.

The safety net runs at run time, not only in tests: :func:`apply` first checks the installed
Megatron-Core version and every fingerprint of the patches it applies, and refuses with
:class:`PatchVerificationError` naming the patch, the version it was written for and the function that
changed. ``MEGATRON_DSV3_UNVERIFIED_PATCHES=1`` applies them anyway (at the user's own risk; said
loudly on stderr). Every change a patch makes is recorded, so :func:`revert` restores the originals.

Training patches (applied by the launcher, ``megatron_dsv3.training``; any device):

- ``typing_override``   ``import megatron.training`` uses ``typing.override`` (Python >= 3.12) on 3.11.
- ``dataset_helpers``   Megatron runs ``make`` on its dataset helpers at start-up; the wheel ships them
                        compiled and without a Makefile, so start-up fails on every wheel install.
- ``training_log_hook`` calls megatron-dsv3's metrics (W&B / console) after each ``training_log``.
- ``reparse_args``      Megatron's own later re-parses of ``sys.argv`` (fault tolerance, in-process
                        restart) include the launcher's flags, so registered dispatcher names parse.
- ``pipeline_schedule`` rebinds the train loop's forward-backward function to the schedule chosen
                        with ``--pipeline-schedule`` (only for a schedule registered by megatron-dsv3).
- ``quiet_gpt_deprecation`` keeps Megatron-Core 0.19.2's "GPTModel IS DEPRECATED" warning (logged on
                        every model build) away from users of our launcher and API.
- ``checkpoint_safety`` hook points around checkpoint save / load: the non-finite check before a
                        save, the manifest once the shards are complete (before the tracker file points
                        at them), a full disk named, the manifest and non-finite checks at load.
- ``nonfinite_step_guard`` a hook between a step's forward-backward and its optimizer step (the NaN/Inf
                        guard stops the step there on every rank).
- ``checkpoint_writer_lifetime`` the checkpoint writer's multiprocessing Manager dies with its rank.

The CPU-only patches live in ``megatron_dsv3/compat/cpu_backend.py`` (same :class:`Patch` type).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

MEGATRON_CORE_VERSION = "0.19.2"
UNVERIFIED_ENV = "MEGATRON_DSV3_UNVERIFIED_PATCHES"

_MISSING = object()


class PatchVerificationError(RuntimeError):
    """The installed Megatron-Core is not the code a patch was written against."""


@dataclass(eq=False)
class Patch:
    """One named change.

    ``install(patch)`` makes the change through :meth:`set` (so it can be reverted). ``targets`` maps
    ``'module:qualname'`` (or ``'file:megatron/relative/path.py'`` for a module that cannot be imported
    before the patch) to the sha1 (first 12 hex digits) of its source in the pinned Megatron-Core.
    """

    name: str
    why: str
    install: Callable[["Patch"], None]
    targets: dict[str, str] = field(default_factory=dict)
    megatron_version: str = MEGATRON_CORE_VERSION
    applied: bool = False
    _saved: list = field(default_factory=list, repr=False)

    def set(self, obj, attr: str, value) -> None:
        """``setattr(obj, attr, value)``, remembering what was there for :meth:`revert`."""
        own = vars(obj) if hasattr(obj, "__dict__") else {}
        self._saved.append((obj, attr, own.get(attr, _MISSING)))
        setattr(obj, attr, value)

    def revert(self) -> None:
        for obj, attr, old in reversed(self._saved):
            if old is _MISSING:
                try:
                    delattr(obj, attr)
                except AttributeError:
                    pass
            else:
                setattr(obj, attr, old)
        self._saved.clear()
        self.applied = False


_ORIGINALS: dict[str, object] = {}


def _megatron_root() -> str:
    import megatron

    return os.path.dirname(list(megatron.__path__)[0])


def resolve(target: str):
    """The object named 'module:qualname' (before any patch replaced it)."""
    if target in _ORIGINALS:
        return _ORIGINALS[target]
    mod_name, _, qual = target.partition(":")
    obj = __import__(mod_name, fromlist=["_"])
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def source_of(target: str) -> str:
    if target.startswith("file:"):
        with open(os.path.join(_megatron_root(), target[len("file:"):])) as f:
            return f.read()
    return inspect.getsource(resolve(target))


_FINGERPRINTS: dict = {}


def source_fingerprint(target: str) -> str:
    """sha1 of the source of ``target`` as installed (first 12 hex digits). Computed once per process
    (inspect.getsource costs ~4 ms a target, ~170 targets are checked at launch); a replaced
    ``source_of`` (the tests' edited-source checks) has its own entries."""
    key = (source_of, target)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = hashlib.sha1(source_of(target).encode()).hexdigest()[:12]
    return _FINGERPRINTS[key]


def installed_megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core").split("+")[0]


def check_fingerprints(patches: list[Patch]) -> dict[str, tuple[str, str]]:
    """Targets whose source differs from the pinned version: {target: (expected, found)}."""
    bad = {}
    for patch in patches:
        for target, expected in patch.targets.items():
            try:
                found = source_fingerprint(target)
            except (AttributeError, ImportError, OSError, TypeError) as err:
                found = f"missing ({type(err).__name__})"
            if found != expected:
                bad[target] = (expected, found)
    return bad


_WARNED: set[str] = set()


def verify(patches: list[Patch], importable_only: bool = False) -> None:
    """Refuse to patch a Megatron-Core the patches were not written for (see the module doc).

    ``importable_only``: skip targets whose module cannot be imported yet (a patch earlier in the
    same :func:`apply` call makes it importable; it is verified again just before it is applied)."""
    problems = []
    version = installed_megatron_version()
    for patch in patches:
        if version != patch.megatron_version:
            problems.append(f"patch {patch.name!r} was written for Megatron-Core {patch.megatron_version}, "
                            f"but {version} is installed")
            continue
        for target, (expected, found) in check_fingerprints([patch]).items():
            if importable_only and found == "missing (ImportError)":
                continue
            problems.append(f"patch {patch.name!r} (written for Megatron-Core {patch.megatron_version}): "
                            f"{target} changed (source sha1 {found}, expected {expected})")
    if not problems:
        return
    if os.environ.get(UNVERIFIED_ENV, "0").lower() in ("1", "true", "yes"):
        for line in problems:
            if line not in _WARNED:
                _WARNED.add(line)
                print(f"[megatron-dsv3] WARNING: {line}; applying it anyway because {UNVERIFIED_ENV}=1. "
                      "Results are unverified.", file=sys.stderr, flush=True)
        return
    raise PatchVerificationError(
        "megatron-dsv3 refuses to patch this Megatron-Core:\n  " + "\n  ".join(problems)
        + f"\nInstall megatron-core=={MEGATRON_CORE_VERSION}, or set {UNVERIFIED_ENV}=1 to apply the "
        "patches anyway at your own risk.")


def apply(patches: list[Patch]) -> None:
    """Verify, then apply each patch once, remembering the originals of its targets. Everything that
    can be checked is checked before anything changes; a target that only imports once an earlier
    patch of the same call is in place is checked just before its own patch, and when that one is
    refused the patches this call applied are reverted: all or nothing."""
    verify([p for p in patches if not p.applied], importable_only=True)
    done = []
    try:
        for patch in patches:
            if patch.applied:
                continue
            verify([patch])
            for target in patch.targets:
                if not target.startswith("file:"):
                    _ORIGINALS.setdefault(target, resolve(target))
            patch.install(patch)
            patch.applied = True
            done.append(patch)
    except BaseException:
        revert(done)
        raise


def revert(patches: list[Patch]) -> None:
    """Undo applied patches (in reverse order)."""
    for patch in reversed(patches):
        if patch.applied:
            patch.revert()


def training_patches() -> list[Patch]:
    """The launcher's patches, in the order they must be applied."""
    from . import (
        checkpoint_safety,
        checkpoint_writer_lifetime,
        dataset_helpers,
        nonfinite_step_guard,
        quiet_gpt_deprecation,
        reparse_args,
        training_log_hook,
        typing_override,
    )

    return [typing_override.PATCH, dataset_helpers.PATCH, training_log_hook.PATCH, reparse_args.PATCH,
            quiet_gpt_deprecation.PATCH, checkpoint_safety.PATCH, nonfinite_step_guard.PATCH,
            checkpoint_writer_lifetime.PATCH]


def all_patches() -> list[Patch]:
    """Every patch in this directory (``pipeline_schedule`` is applied only on demand)."""
    from . import pipeline_schedule

    return training_patches() + [pipeline_schedule.PATCH]
