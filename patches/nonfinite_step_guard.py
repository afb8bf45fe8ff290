"""nonfinite_step_guard: a hook between a training step's forward-backward and its optimizer step.

``megatron.training.training.train_step`` runs the forward-backward function (which also reduces
the gradients and runs ``finalize_model_grads``) and then ``optimizer.step()``, with no callback in
between. Megatron's own NaN check lives in the DDP gradient buckets and reports to the rerun state
machine, one rank at a time, before the data-parallel reduction. The patch wraps ``train_step`` and
the forward-backward function it receives: :data:`HOOKS` ``start(model, iteration)`` runs at the
start of the step, ``after_forward_backward(model, iteration)`` after every training (not
forward-only) forward-backward call and before the optimizer step; it may raise to stop the step.
``iteration`` is train_step's argument: the number of steps already done (the console log calls
this step ``iteration + 1``).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from . import Patch, resolve

TARGET = "megatron.training.training:train_step"

#: The hook functions (None: nothing runs).
HOOKS: dict[str, Optional[Callable]] = {"start": None, "after_forward_backward": None}


def _install(patch: Patch) -> None:
    from megatron.training import training

    original = resolve(TARGET)

    @functools.wraps(original)
    def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
                   forward_backward_func, *args, **kwargs):
        iteration = kwargs.get("iteration", args[0] if args else None)
        if HOOKS["start"] is not None:
            HOOKS["start"](model, iteration)

        @functools.wraps(forward_backward_func)
        def guarded(*a, **kw):
            out = forward_backward_func(*a, **kw)
            if not kw.get("forward_only", False) and HOOKS["after_forward_backward"] is not None:
                HOOKS["after_forward_backward"](model, iteration)
            return out

        return original(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
                        guarded, *args, **kwargs)

    patch.set(training, "train_step", train_step)


PATCH = Patch(
    "nonfinite_step_guard",
    "train_step() calls optimizer.step() right after the forward-backward with no callback to stop "
    "a step whose loss or gradients are not finite",
    _install,
    {TARGET: "1e035d27a23a", "megatron.training.training:train": "f4a950fdd4d0"},
)
