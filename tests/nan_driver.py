"""The launcher with NaN / Inf injected, for tests/test_reliability.py:

    torchrun tests/nan_driver.py MODE SPEC <launcher args>

forward  ITER,LAYER,RANK,MICRO  decoder layer LAYER's output becomes NaN in step ITER, on rank RANK
                                only, in its MICRO-th micro-batch only
backward ITER,LAYER             the gradient flowing into decoder layer LAYER's output becomes
                                non-finite in step ITER (the forward stays finite)
hang     ITER,RANK              rank RANK stops (sleeps) in decoder layer 1's forward of step ITER:
                                a hung rank, for --distributed-timeout-minutes
weights  UNCHECKED,CHECKED      after step UNCHECKED one element of WEIGHT becomes NaN and that
                                step's checkpoint is saved with the launcher's non-finite check
                                switched off (then the element is restored: a checkpoint holding
                                NaN, for the load test); after step CHECKED the element becomes NaN
                                again and the save runs with the check on

Steps are numbered as the console log numbers them. The injection goes through the launcher's own
hook tables (the patches' fingerprinted Megatron functions stay untouched).
"""
import sys

import torch

from megatron_dsv3.compat.patches import checkpoint_safety, training_log_hook
from megatron_dsv3.training import launcher, safety

WEIGHT = "decoder.layers.1.self_attention.linear_proj.weight"   # decoder layer 2


class _S:
    step = 0
    calls = 0
    hooked = False
    saved_value = None
    saved_before_save = None


def _decoder_layer(model, number):
    from megatron.core.utils import unwrap_model

    for chunk in model:
        for layer in unwrap_model(chunk).decoder.layers:
            if layer.layer_number == number:
                return layer
    return None


def _param(name):
    from megatron.core.utils import unwrap_model

    from megatron_dsv3.training.providers import MODEL_CHUNKS

    return dict(unwrap_model(MODEL_CHUNKS[0]).named_parameters())[name]


def _forward(spec):
    it, layer_no, rank, micro = (int(x) for x in spec.split(","))

    def hook(module, inputs, output):
        if _S.step != it or torch.distributed.get_rank() != rank:
            return None
        _S.calls += 1
        if _S.calls != micro:
            return None
        print(f"DSV3_TEST: NaN injected into decoder layer {layer_no}, step {it}, rank {rank}, "
              f"micro-batch {micro}", flush=True)
        return (output[0] * float("nan"),) + tuple(output[1:])
    return layer_no, hook


def _hang(spec):
    it, rank = (int(x) for x in spec.split(","))

    def hook(module, inputs, output):
        if _S.step == it and torch.distributed.get_rank() == rank:
            import time

            print(f"DSV3_TEST: rank {rank} hangs in step {it}", flush=True)
            time.sleep(3600)
        return None
    return 1, hook


def _backward(spec):
    it, layer_no = (int(x) for x in spec.split(","))

    def hook(module, inputs, output):
        if _S.step == it:
            output[0].register_hook(lambda g: g * float("inf"))
            print(f"DSV3_TEST: Inf injected into the gradient of decoder layer {layer_no}, step {it}",
                  flush=True)
        return None
    return layer_no, hook


def _weights(spec):
    unchecked, checked = (int(x) for x in spec.split(","))

    def poison():
        p = _param(WEIGHT)
        _S.saved_value = p.data.view(-1)[0].item()
        p.data.view(-1)[0] = float("nan")

    def on_log(iteration, **_):
        if iteration == unchecked:
            poison()
            _S.saved_before_save = checkpoint_safety.HOOKS["before_save"]
            checkpoint_safety.HOOKS["before_save"] = None
            print(f"DSV3_TEST: {WEIGHT} poisoned, unchecked save at {iteration}", flush=True)
        elif iteration == checked:
            poison()
            print(f"DSV3_TEST: {WEIGHT} poisoned, checked save at {iteration}", flush=True)

    training_log_hook.HOOKS.append(on_log)
    original_install = safety.install

    def install(args):
        original_install(args)
        after_shards = checkpoint_safety.HOOKS["after_shards"]

        def after_shards_then_restore(checkpoint_dir, async_save):
            after_shards(checkpoint_dir, async_save)
            if _S.saved_before_save is not None:      # the unchecked save is complete: undo
                _param(WEIGHT).data.view(-1)[0] = _S.saved_value
                checkpoint_safety.HOOKS["before_save"] = _S.saved_before_save
                _S.saved_before_save = None

        checkpoint_safety.HOOKS["after_shards"] = after_shards_then_restore

    safety.install = install


def _model_hook(layer_no, hook):
    original_install = safety.install

    def install(args):
        original_install(args)
        from megatron_dsv3.compat.patches import nonfinite_step_guard

        start = nonfinite_step_guard.HOOKS["start"]

        def start_and_inject(model, iteration):
            _S.step, _S.calls = iteration + 1, 0
            if not _S.hooked:     # registered before the guard's own hooks: the guard sees the NaN
                _decoder_layer(model, layer_no).register_forward_hook(hook)
                _S.hooked = True
            start(model, iteration)

        nonfinite_step_guard.HOOKS["start"] = start_and_inject

    safety.install = install


if __name__ == "__main__":   # dist_checkpointing starts a spawn-context Manager, which re-imports us
    mode, spec = sys.argv.pop(1), sys.argv.pop(1)
    if mode == "weights":
        _weights(spec)
    else:
        _model_hook(*{"forward": _forward, "backward": _backward, "hang": _hang}[mode](spec))
    launcher.main()
