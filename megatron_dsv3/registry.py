"""Where megatron-dsv3 plugs into Megatron-Core: one table per extension point.

Launchers and tools resolve names here instead of if/elif chains, so later parts (our node-limited
dispatcher, the DualPipe schedules) register themselves without touching their callers.
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

#: ``--moe-token-dispatcher-type`` values. Megatron-Core's own dispatchers are selected inside its
#: MoELayer by name; entries mapping to None use that path unchanged.
DISPATCHERS: dict[str, type | None] = {"alltoall": None, "allgather": None}

#: ``--pipeline-schedule`` values -> forward-backward function factory (None: Megatron-Core's own
#: get_forward_backward_func: no pipelining, 1F1B or interleaved).
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
