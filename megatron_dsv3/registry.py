"""Where megatron-dsv3 plugs into Megatron-Core: one table per extension point.

Launchers and tools resolve names here instead of if/elif chains; implementations register
themselves where they are defined, so later parts register without touching their callers:

    @register(DISPATCHERS, "node_limited")
    class NodeLimitedDispatcher(MoETokenDispatcher): ...

    @register(SCHEDULES, "dualpipev")
    def dualpipev_forward_backward_func(**get_forward_backward_func_kwargs): ...

This module imports nothing of the package (everything else may import it); the modules that
register built-in entries are imported the first time a table is read through :func:`resolve` /
:func:`names`.
"""
from __future__ import annotations

import importlib
from typing import Callable

#: Megatron-LM ``--spec <module> <function>`` targets.
SPECS: dict[str, Callable] = {}

#: ``--moe-token-dispatcher-type`` values. None: Megatron-Core's own dispatcher of that name, chosen
#: inside its MoELayer. A class: built by our MoE layer (``model.moe.DSv3MoELayer``) with Megatron's
#: dispatcher constructor ``(num_local_experts, local_expert_indices, config=, pg_collection=)``
#: (plus ``topology=`` when the class sets ``needs_topology``). A class declares the Megatron
#: dispatcher whose behaviour it provides as ``megatron_dispatcher`` (default "alltoall"): Megatron's
#: config checks and code paths that test ``moe_token_dispatcher_type`` see that name.
DISPATCHERS: dict[str, type | None] = {"alltoall": None, "allgather": None, "flex": None}

#: ``--pipeline-schedule`` values. None: Megatron-Core's own ``get_forward_backward_func`` (no
#: pipelining, 1F1B or interleaved 1F1B). A callable: a replacement for that function, taking the same
#: arguments and returning a forward-backward function with Megatron's keyword-only signature.
#: Optional attributes of that callable: ``build_model_chunks(build_one, config, pg_collection,
#: replicated_linears)`` (the model provider lets the schedule place this rank's chunks: DualPipe's two
#: stages) and ``check_launch(args, fields)`` (raises ValueError naming the flag; called by the
#: launch checks). ``dualpipe`` / ``dualpipev``: ``parallel/schedules/dualpipe.py``.
SCHEDULES: dict[str, Callable | None] = {"1f1b": None}

#: Modules whose import registers the built-in entries.
_BUILTINS = ("megatron_dsv3.model.spec", "megatron_dsv3.parallel.dispatcher",
             "megatron_dsv3.parallel.schedules.dualpipe")


def register(table: dict, name: str):
    """Decorator: ``@register(DISPATCHERS, "node_limited")``; a duplicate name is an error."""
    def deco(obj):
        if name in table and table[name] is not obj:
            raise KeyError(f"{name!r} is already registered")
        table[name] = obj
        return obj
    return deco


def _load_builtins() -> None:
    for module in _BUILTINS:
        importlib.import_module(module)


def names(table: dict) -> list[str]:
    """The registered names of ``table`` (built-ins included)."""
    _load_builtins()
    return sorted(table)


def resolve(table: dict, name: str, what: str):
    _load_builtins()
    if name not in table:
        raise KeyError(f"unknown {what} {name!r}; registered: {sorted(table)}")
    return table[name]


def dispatcher_class(name: str):
    """The registered dispatcher class, or None for Megatron-Core's own dispatcher ``name``."""
    return resolve(DISPATCHERS, name, "--moe-token-dispatcher-type")


def megatron_dispatcher(name: str) -> str:
    """The Megatron-Core dispatcher name Megatron's own code should see for dispatcher ``name``."""
    cls = dispatcher_class(name)
    return name if cls is None else getattr(cls, "megatron_dispatcher", "alltoall")


def registered_dispatcher(name: str):
    """The class registered as ``name`` (None for Megatron-Core's own or unknown names)."""
    _load_builtins()
    return DISPATCHERS.get(name)


def install_schedule(name: str) -> None:
    """Make megatron.training's train loop use the schedule registered as ``name``."""
    factory = resolve(SCHEDULES, name, "--pipeline-schedule")
    if factory is not None:
        from .compat.patches import apply, pipeline_schedule

        pipeline_schedule.FACTORY[0] = factory
        apply([pipeline_schedule.PATCH])
