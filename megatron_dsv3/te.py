"""Transformer Engine layers (FP8 on NVIDIA GPUs). Import-guarded: TE is an optional extra.

Only imported when ``config.transformer_impl == "transformer_engine"``; without TE it raises a
clear error naming the install step. Checked on a GPU only (``tools/gpu_check.sh``): TE cannot be
installed on the CPU machines.
"""
from __future__ import annotations

from functools import partial

TE_MISSING = (
    "Transformer Engine is not installed, but transformer_impl='transformer_engine' (or FP8) was "
    "asked for. Install it on a CUDA machine with `pip install 'megatron-dsv3[te]'`, or use "
    "--transformer-impl local (CPU runs always use local).")


def require_te():
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as mte
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise RuntimeError(TE_MISSING) from err
    if not mte.HAVE_TE:  # pragma: no cover
        raise RuntimeError(TE_MISSING)
    return mte


def te_backend(config):
    mte = require_te()  # pragma: no cover - GPU only below
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    from .spec import Backend

    return Backend(
        column=mte.TEColumnParallelLinear,
        row=mte.TERowParallelLinear,
        duplicated=partial(mte.TELinear, parallel_mode="duplicated", skip_weight_param_allocation=False),
        norm=mte.TENorm,
        experts=TESpecProvider().grouped_mlp_modules(bool(config.moe_grouped_gemm)),
    )
