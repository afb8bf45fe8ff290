"""patches/: every change to Megatron is named, pinned to the Megatron-Core source it was written
against (sha1 fingerprints), and does what it says."""
from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from megatron_dsv3.compat import patches
from megatron_dsv3.compat.patches import MEGATRON_CORE_VERSION, check_fingerprints, source_fingerprint, typing_override

patches.apply([typing_override.PATCH])   # the targets live in megatron.training


def test_pinned_megatron_version():
    import megatron.core

    assert megatron.core.__version__.split("+")[0] == MEGATRON_CORE_VERSION


def test_every_patch_is_named_and_its_targets_unchanged():
    found = patches.all_patches()
    names = [p.name for p in found]
    assert len(names) == len(set(names)) and all(p.why for p in found)
    assert all(p.megatron_version == MEGATRON_CORE_VERSION for p in found)
    assert check_fingerprints(found) == {}, "Megatron changed under a patch: re-check it"


def test_metrics_internals_unchanged():
    """megatron_dsv3.metrics reads Megatron's timer and its MTP / MoE W&B metric names."""
    from megatron_dsv3.training.metrics import RELIES_ON

    assert {t: source_fingerprint(t) for t in RELIES_ON} == RELIES_ON


def test_typing_override_on_311():
    assert hasattr(typing, "override")
    import megatron.training.models.gpt  # noqa: F401  (imports typing.override)


def test_dataset_helpers_never_run_make_when_compiled(monkeypatch):
    from megatron_dsv3.compat.patches import dataset_helpers

    patches.apply([dataset_helpers.PATCH])
    from megatron.core.datasets import utils

    def no_make(*args, **kwargs):
        raise AssertionError(f"make was run: {args}")

    monkeypatch.setattr(subprocess, "run", no_make)
    utils.compile_helpers()          # the wheel ships helpers_cpp: nothing to build
    from megatron.core.datasets import helpers_cpp  # noqa: F401


def test_dataset_helpers_fall_back_to_make_without_the_extension(monkeypatch):
    from megatron_dsv3.compat.patches import dataset_helpers

    calls = []
    import megatron.core.datasets as package

    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)   # import fails
    monkeypatch.delattr(package, "helpers_cpp", raising=False)
    monkeypatch.setitem(patches._ORIGINALS, dataset_helpers.TARGET, lambda: calls.append("make"))
    dataset_helpers.compile_helpers_if_missing()
    assert calls == ["make"]


def test_pipeline_schedule_patch_needs_a_factory():
    """Applied without a chosen schedule it refuses (the launcher's use is in test_pretrain)."""
    from megatron_dsv3.compat.patches import pipeline_schedule

    saved, pipeline_schedule.FACTORY[0] = pipeline_schedule.FACTORY[0], None
    try:
        with pytest.raises(RuntimeError, match="no schedule factory"):
            pipeline_schedule.PATCH.install(pipeline_schedule.PATCH)
    finally:
        pipeline_schedule.FACTORY[0] = saved


def test_gpt_deprecation_warning_is_not_shown_to_our_users(cpu_world, caplog):
    """build_model drops exactly Megatron-Core 0.19.2's "GPTModel IS DEPRECATED" record; the logger's
    other records still pass."""
    import logging

    from megatron_dsv3.compat.patches import quiet_gpt_deprecation
    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.spec import build_model

    with caplog.at_level(logging.WARNING, logger=quiet_gpt_deprecation.LOGGER):
        build_model(DSv3Config.from_preset("tiny", **cpu_overrides()))
        logging.getLogger(quiet_gpt_deprecation.LOGGER).warning("another GPTModel warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "DEPRECATED" in m], messages
    assert "another GPTModel warning" in messages
    quiet_gpt_deprecation.PATCH.revert()          # without the filter the record is there
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=quiet_gpt_deprecation.LOGGER):
            logging.getLogger(quiet_gpt_deprecation.LOGGER).warning("GPTModel IS DEPRECATED. GPTModel is ...")
        assert any("GPTModel IS DEPRECATED" in r.getMessage() for r in caplog.records)
    finally:
        patches.apply([quiet_gpt_deprecation.PATCH])
