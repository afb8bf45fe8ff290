"""dataset_helpers: do not ``make`` Megatron's dataset helpers when the compiled module is installed.

``initialize_megatron`` calls ``megatron.core.datasets.utils.compile_helpers`` on rank 0, which runs
``make -C megatron/core/datasets``. The megatron-core wheel ships the compiled ``helpers_cpp``
extension but no Makefile, so that ``make`` fails and the job exits. The patched function imports
the shipped extension and only falls back to Megatron's ``make`` when it is missing (a source
checkout).
"""
from __future__ import annotations

from . import Patch, resolve

TARGET = "megatron.core.datasets.utils:compile_helpers"


def compile_helpers_if_missing() -> None:
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        resolve(TARGET)()


def _install(patch: Patch) -> None:
    from megatron.core.datasets import utils

    patch.set(utils, "compile_helpers", compile_helpers_if_missing)


PATCH = Patch(
    "dataset_helpers",
    "initialize_megatron runs `make` on dataset helpers the wheel already ships compiled",
    _install,
    {TARGET: "be6ad313e935", "megatron.training.initialize:_compile_dependencies": "1a5adcc542a6"},
)
