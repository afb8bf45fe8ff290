"""checkpoint_safety: hook points around Megatron's checkpoint save and load.

``megatron.training`` offers no callback between "every shard of a checkpoint is written" and "the
tracker file (``latest_checkpointed_iteration.txt``) points at it", nor before a checkpoint is read
or after it was loaded into the model. The patch wraps three names and calls the functions in
:data:`HOOKS` (set by ``megatron_dsv3.training.safety``; a hook left at None does nothing):

- ``megatron.training.training.save_checkpoint`` (called by ``save_checkpoint_and_time``):
  ``before_save(iteration, model, optimizer)`` runs before Megatron creates anything on disk;
- ``megatron.core.dist_checkpointing.save`` (called by ``save_checkpoint`` before it writes the
  tracker file): ``after_shards(checkpoint_dir, async_save)`` runs once the original returned, i.e.
  every rank's shards and the metadata are written; ``on_save_error(exc, checkpoint_dir)`` sees any
  exception of the save (and may raise a clearer one);
- ``megatron.training.training.load_checkpoint`` (called by ``setup_model_and_optimizer``):
  ``before_load(load_arg)`` runs before Megatron reads the checkpoint, ``after_load(model,
  optimizer, result)`` after it was loaded.

The tracker file is written by Megatron only after ``dist_checkpointing.save`` returned on every
rank (a synchronous save), so whatever ``after_shards`` writes exists before the checkpoint becomes
``latest``.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from . import Patch, resolve

SAVE_CHECKPOINT = "megatron.training.training:save_checkpoint"
LOAD_CHECKPOINT = "megatron.training.training:load_checkpoint"
DIST_SAVE = "megatron.core.dist_checkpointing.serialization:save"

#: The hook functions (None: nothing runs).
HOOKS: dict[str, Optional[Callable]] = {
    "before_save": None, "after_shards": None, "on_save_error": None,
    "before_load": None, "after_load": None,
}


def _call(name: str, *args):
    hook = HOOKS[name]
    if hook is not None:
        hook(*args)


def _install(patch: Patch) -> None:
    from megatron.core import dist_checkpointing
    from megatron.training import training

    original_save_checkpoint = resolve(SAVE_CHECKPOINT)
    original_load_checkpoint = resolve(LOAD_CHECKPOINT)
    inner_dist_save = dist_checkpointing.save      # (a test driver may already have wrapped it)

    @functools.wraps(original_save_checkpoint)
    def save_checkpoint(iteration, model, optimizer, *args, **kwargs):
        _call("before_save", iteration, model, optimizer)
        return original_save_checkpoint(iteration, model, optimizer, *args, **kwargs)

    @functools.wraps(inner_dist_save)
    def dist_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        try:
            result = inner_dist_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
            _call("after_shards", str(checkpoint_dir), bool(kwargs.get("async_sharded_save", False)))
        except BaseException as exc:   # (torch's CheckpointException is a BaseException)
            if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                _call("on_save_error", exc, str(checkpoint_dir))
            raise
        return result

    @functools.wraps(original_load_checkpoint)
    def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg="load", *args, **kwargs):
        _call("before_load", load_arg)
        result = original_load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg, *args, **kwargs)
        _call("after_load", ddp_model, optimizer, result)
        return result

    patch.set(training, "save_checkpoint", save_checkpoint)
    patch.set(training, "load_checkpoint", load_checkpoint)
    patch.set(dist_checkpointing, "save", dist_save)


PATCH = Patch(
    "checkpoint_safety",
    "no callback between a checkpoint's shards being complete and the tracker file pointing at it, "
    "nor before / after a checkpoint is loaded",
    _install,
    {SAVE_CHECKPOINT: "85de15f271df", LOAD_CHECKPOINT: "b1765bde67b3", DIST_SAVE: "08b7c9044ee7",
     "megatron.training.training:save_checkpoint_and_time": "79e1f392e009",
     "megatron.training.training:setup_model_and_optimizer": "e4ebc691c176",
     "megatron.training.checkpointing:_load_base_checkpoint": "9647ec386535",
     "megatron.training.checkpointing:read_metadata": "373ae63fc67f",
     "megatron.training.checkpointing:get_checkpoint_name": "be8bde5e717f"},
)
