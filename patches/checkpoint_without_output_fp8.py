"""checkpoint_without_output_fp8: selective recomputation of norms without Transformer Engine.

Megatron-Core 0.19.2's ``CheckpointWithoutOutput.__init__(fp8=False)`` stores ``fp8 is not None``, so
its default ``False`` reads as "ask Transformer Engine whether FP8 is on", and
``CheckpointWithoutOutputFunction.forward`` then calls ``FP8GlobalStateManager``, which exists only
when TE is installed: ``--recompute-modules layernorm`` (TransformerLayer builds
``CheckpointWithoutOutput()``) fails on its first step without TE (NameError). Without TE there is no
FP8, so the patched ``__init__`` answers False; with TE installed the patch is not applied.
"""
from __future__ import annotations

import functools

from . import Patch, resolve

TARGET = "megatron.core.tensor_parallel.random:CheckpointWithoutOutput.__init__"


def _install(patch: Patch) -> None:
    from megatron.core.tensor_parallel import random as tp_random

    if hasattr(tp_random, "FP8GlobalStateManager"):    # Transformer Engine present: Megatron's is right
        return
    original = resolve(TARGET)

    @functools.wraps(original)
    def __init__(self, fp8=False):
        original(self, fp8)
        self.fp8 = False            # no Transformer Engine, no FP8

    patch.set(tp_random.CheckpointWithoutOutput, "__init__", __init__)


PATCH = Patch(
    "checkpoint_without_output_fp8",
    "CheckpointWithoutOutput() reads its default fp8=False as FP8 on and needs Transformer Engine for it",
    _install,
    {TARGET: "06132eee867d",
     "megatron.core.tensor_parallel.random:CheckpointWithoutOutputFunction.forward": "600ccf6b2a48",
     "megatron.core.transformer.transformer_layer:TransformerLayer._forward_attention": "2d56f0428d4e",
     "megatron.core.transformer.transformer_layer:TransformerLayer._forward_pre_mlp_layernorm": "0927fd99cd24"},
)
