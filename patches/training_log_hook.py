"""training_log_hook: run megatron-dsv3's metrics after every ``training_log`` call.

``megatron.training.training.train`` calls ``training_log`` once per iteration on every rank, with
the iteration's losses, learning rate and grad norm; there is no callback argument. The wrapper calls
the original, then every function in :data:`HOOKS` with the same values (all ranks, so hooks may use
collectives), plus ``wandb_logged``: the scalars Megatron itself sent to W&B during the call (its MTP
and MoE losses, reduced over ranks), so hooks need not recompute them. Megatron's own logging is
unchanged.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from . import Patch, resolve

TARGET = "megatron.training.training:training_log"

#: Called as ``hook(iteration=, loss_dict=, learning_rate=, grad_norm=, skipped_iter=, wandb_logged=)``.
HOOKS: list[Callable] = []


def _install(patch: Patch) -> None:
    from megatron.training import training

    original = resolve(TARGET)

    @functools.wraps(original)
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                     report_memory_flag, skipped_iter, grad_norm, *args, **kwargs):
        from megatron.training.global_vars import get_wandb_writer

        writer, logged = get_wandb_writer(), {}
        if writer is not None:
            log = writer.log

            def recording_log(data, step=None, *a, **kw):
                logged.update({k: v for k, v in data.items() if isinstance(v, (int, float, torch.Tensor))})
                return log(data, step, *a, **kw)

            writer.log = recording_log
        try:
            result = original(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                              report_memory_flag, skipped_iter, grad_norm, *args, **kwargs)
        finally:
            if writer is not None:
                writer.log = log
        for hook in HOOKS:
            hook(iteration=iteration, loss_dict=loss_dict, learning_rate=learning_rate,
                 grad_norm=grad_norm, skipped_iter=skipped_iter, wandb_logged=logged)
        return result

    patch.set(training, "training_log", training_log)


PATCH = Patch(
    "training_log_hook",
    "train() calls training_log each iteration with no callback for extra metrics",
    _install,
    {TARGET: "02a4e7b41dea", "megatron.training.training:train": "f4a950fdd4d0"},
)
