"""pipeline_schedule: let ``--pipeline-schedule`` choose megatron.training's forward-backward function.

``megatron.training.training.train`` and ``evaluate`` call the module-level name
``get_forward_backward_func`` imported from Megatron-Core; there is no argument to pass another
schedule. The patch rebinds that name to the factory registered in
``megatron_dsv3.registry.SCHEDULES`` (only when a non-default schedule is chosen).
"""
from __future__ import annotations

from typing import Callable, Optional

from . import Patch

TARGET = "megatron.training.training:get_forward_backward_func"

#: The chosen factory (set by ``registry.install_schedule`` before the patch is applied).
FACTORY: list[Optional[Callable]] = [None]


def _install(patch: Patch) -> None:
    from megatron.training import training

    if FACTORY[0] is None:
        raise RuntimeError("pipeline_schedule: no schedule factory chosen")
    patch.set(training, "get_forward_backward_func", FACTORY[0])


PATCH = Patch(
    "pipeline_schedule",
    "train()/evaluate() call Megatron-Core's get_forward_backward_func with no way to pass another",
    _install,
    {TARGET: "e41c9d561cb5", "megatron.training.training:train": "f4a950fdd4d0",
     "megatron.training.training:evaluate": "e21250873fb0"},
)
