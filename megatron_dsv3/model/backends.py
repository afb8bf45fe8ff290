"""The layer classes of one build: Megatron-Core's local layers (CPU and any GPU) or Transformer
Engine's (FP8 on NVIDIA GPUs). One spec function serves both (:mod:`megatron_dsv3.model.spec`).

Transformer Engine is an optional extra and import-guarded: asking for it without it installed raises
a clear error naming the install step. It cannot be installed on the CPU machines, so the TE backend
is checked on a GPU only (``tools/gpu_check.sh``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

TE_MISSING = (
    "Transformer Engine is not installed, but transformer_impl='transformer_engine' (or FP8) was "
    "asked for. Install it on a CUDA machine with `pip install 'megatron-dsv3[te]'`, or use "
    "--transformer-impl local (CPU runs always use local).")


@dataclass(frozen=True)
class Backend:
    """The layer classes one build uses."""

    column: type
    row: type
    duplicated: type
    norm: type
    experts: object
    #: the MTP module's eh_proj when it must differ from ``duplicated`` (FP8 emulation keeps it in the
    #: training precision, as the TE build does: it runs outside the FP8 context); None = ``duplicated``
    mtp_proj: object = None


def require_te():
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as mte
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise RuntimeError(TE_MISSING) from err
    if not mte.HAVE_TE:  # pragma: no cover
        raise RuntimeError(TE_MISSING)
    return mte


def local_backend(config) -> Backend:
    from megatron.core.models.backends import LocalSpecProvider

    from .experts import GroupedExperts
    from .linear import LocalColumnParallelLinear, LocalRowParallelLinear
    from .mla import DuplicatedLinear
    from .norm import RMSNorm

    sequential = LocalSpecProvider().grouped_mlp_modules(False)     # partial(SequentialMLP, submodules=...)
    return Backend(column=LocalColumnParallelLinear, row=LocalRowParallelLinear, duplicated=DuplicatedLinear,
                   norm=RMSNorm, experts=partial(GroupedExperts, **sequential.keywords))


def te_backend(config) -> Backend:
    mte = require_te()  # pragma: no cover - GPU only below
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return Backend(
        column=mte.TEColumnParallelLinear,
        row=mte.TERowParallelLinear,
        duplicated=partial(mte.TELinear, parallel_mode="duplicated", skip_weight_param_allocation=False),
        norm=mte.TENorm,
        experts=TESpecProvider().grouped_mlp_modules(bool(config.moe_grouped_gemm)),
    )


def backend_for(config) -> Backend:
    """The backend ``config.transformer_impl`` names (local with emulated FP8 GEMMs when the config is
    marked by :func:`megatron_dsv3.model.fp8_emulation.enable`, i.e. ``--fp8-emulation``)."""
    from . import fp8_emulation

    if fp8_emulation.enabled(config):
        return fp8_emulation.fp8_emulation_backend(config)
    if config.transformer_impl == "transformer_engine":
        return te_backend(config)
    return local_backend(config)


def mtp_decoder_layer(config, layer: type) -> type:
    """The class of the MTP depth's decoder layer. With FP8 on Transformer Engine, Megatron-Core's own MTP
    layer runs its decoder layer inside ``get_fp8_context(config)``; our DSv3MTPLayer replaces that class, so
    the layer enters the context itself (its eh_proj stays outside: BF16, as in the released FP8 checkpoint).
    """
    if not getattr(config, "fp8", None) or config.transformer_impl != "transformer_engine":
        return layer
    return _fp8_context_layer(layer)


def _fp8_context_layer(layer: type) -> type:  # pragma: no cover - GPU + Transformer Engine only
    class FP8ContextLayer(layer):
        """``layer`` whose forward runs inside Megatron-Core's FP8 context (``get_fp8_context``)."""

        def forward(self, *args, **kwargs):
            from megatron.core.fp8_utils import get_fp8_context

            with get_fp8_context(self.config):
                return super().forward(*args, **kwargs)

    FP8ContextLayer.__name__ = FP8ContextLayer.__qualname__ = f"FP8Context{layer.__name__}"
    return FP8ContextLayer
