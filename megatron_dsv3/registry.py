"""Where megatron-dsv3 plugs into Megatron-Core: one table per extension point.

Launchers and tools resolve names here instead of if/elif chains, so later parts (our node-limited
dispatcher, the DualPipe schedules) register themselves without touching their callers:

    @register(DISPATCHERS, "node_limited")
    class NodeLimitedDispatcher(MoEAlltoAllTokenDispatcher): ...

    @register(SCHEDULES, "dualpipev")
    def dualpipev_forward_backward_func(schedule_pg_collection=None): return run_dualpipev
"""
from __future__ import annotations

from typing import Callable

from . import spec

#: Megatron-LM ``--spec <module> <function>`` targets.
SPECS: dict[str, Callable] = {
    "decoder_block": spec.get_dsv3_decoder_block_spec,
    "mtp_block": spec.get_dsv3_mtp_block_spec,
    "layer": spec.get_dsv3_layer_spec,
}

#: ``--moe-token-dispatcher-type`` values. None: Megatron-Core's own dispatcher of that name, chosen
#: inside its MoELayer. A class: built by our MoE layer (``spec.DSv3MoELayer``) with Megatron's
#: dispatcher constructor ``(num_local_experts, local_expert_indices, config=, pg_collection=)``.
DISPATCHERS: dict[str, type | None] = {"alltoall": None, "allgather": None, "flex": None}

#: ``--pipeline-schedule`` values. None: Megatron-Core's own ``get_forward_backward_func`` (no
#: pipelining, 1F1B or interleaved 1F1B). A callable: a replacement for that function, taking the same
#: arguments and returning a forward-backward function with Megatron's keyword-only signature.
SCHEDULES: dict[str, Callable | None] = {"1f1b": None}


def register(table: dict, name: str):
    """Decorator: ``@register(DISPATCHERS, "node_limited")``; a duplicate name is an error."""
    def deco(obj):
        if name in table:
            raise KeyError(f"{name!r} is already registered")
        table[name] = obj
        return obj
    return deco


def resolve(table: dict, name: str, what: str):
    if name not in table:
        raise KeyError(f"unknown {what} {name!r}; registered: {sorted(table)}")
    return table[name]


def dispatcher_class(name: str):
    """The registered dispatcher class, or None for Megatron-Core's own dispatcher ``name``."""
    return resolve(DISPATCHERS, name, "--moe-token-dispatcher-type")


def install_schedule(name: str) -> None:
    """Make megatron.training's train loop use the schedule registered as ``name``."""
    factory = resolve(SCHEDULES, name, "--pipeline-schedule")
    if factory is not None:
        from .patches import apply, pipeline_schedule

        pipeline_schedule.FACTORY[0] = factory
        apply([pipeline_schedule.PATCH])
