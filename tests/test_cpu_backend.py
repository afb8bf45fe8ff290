"""The CPU backend: every patch is named, fingerprinted against Megatron-Core 0.19.2 and verified at run
time, works, and is undone by disable(); it also runs a stock Megatron-Core training script."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from launch import ROOT, launch
from megatron_dsv3.compat import cpu_backend

ENV = {k: v for k, v in os.environ.items() if k != "MEGATRON_DSV3_CPU"}
ENV.update(TORCHDYNAMO_DISABLE="1", PYTHONPATH=ROOT)


def _python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=300, cwd=ROOT)


def test_every_patch_targets_unchanged_megatron_source(cpu_world):
    import megatron.core

    assert megatron.core.__version__.split("+")[0] == "0.19.2"
    assert cpu_backend.check_fingerprints() == {}, "Megatron-Core changed under a CPU patch: re-check it"
    every = cpu_backend.PATCHES + cpu_backend.TRAINING_PATCHES
    names = [p.name for p in every]
    assert len(names) == len(set(names)) and all(p.targets and p.why for p in every)


def test_patches_behave(cpu_world):
    assert cpu_backend.is_enabled()
    # cuda_current_device / cuda_tensor_methods
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    # cuda_device_literals: only the listed Megatron modules see the CPU factories
    from megatron.core.pipeline_parallel import schedules

    assert isinstance(schedules.torch, cpu_backend.CpuTorch)
    assert schedules.torch.zeros(2, device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor
    # cuda_rng_on_cpu: Megatron's tracker forks reproducible streams
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    with tracker.fork():
        a = torch.rand(3)
    tracker.set_states(states)
    with tracker.fork():
        b = torch.rand(3)
    assert torch.equal(a, b)
    # cuda_streams_noop
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        pass
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    # dispatcher_splits_numpy
    from megatron.core.transformer.moe import token_dispatcher

    assert isinstance(token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True), np.ndarray)
    # optimizer_cuda_type
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_no_global_interception():
    """Outside the patched Megatron modules torch is plain torch: no TorchFunctionMode is active and a
    literal CUDA device still fails (on this CPU-only machine) instead of being silently rewritten."""
    out = _python("from megatron_dsv3 import cpu_backend; cpu_backend.enable(training=True)\n"
                  "import torch\nfrom torch.overrides import _get_current_function_mode_stack as st\n"
                  "print('MODES', len(st()))\n"
                  "try:\n    torch.zeros(1, device='cuda'); print('REWRITTEN')\nexcept Exception:\n    print('RAISED')\n")
    assert "MODES 0" in out.stdout and "RAISED" in out.stdout, out.stdout + out.stderr[-3000:]


def test_disable_restores_torch_and_megatron():
    """enable(training=True) then disable(): every attribute of torch, torch.cuda, Tensor, Module and
    every imported Megatron module is the very object it was before, the environment is as before,
    and torch behaves as before."""
    code = r'''
import os, sys, torch
from megatron_dsv3.compat.patches import apply, typing_override
apply([typing_override.PATCH])
import megatron.training.training, megatron.training.initialize, megatron.training.arguments
import megatron.core.pipeline_parallel.schedules, megatron.core.optimizer.clip_grads
from megatron_dsv3 import cpu_backend
typing_override.PATCH.revert()        # enable(training=True) applies it; disable() must take it back
import typing
import types
def snapshot():
    spaces = {"torch": torch, "torch.cuda": torch.cuda, "Tensor": torch.Tensor, "Module": torch.nn.Module,
              "typing": typing}
    spaces.update({n: m for n, m in sys.modules.items() if n.startswith("megatron.") and m is not None})
    return {(n, k): v for n, s in spaces.items() for k, v in list(vars(s).items())}
before, env = snapshot(), dict(os.environ)
cpu_backend.enable(training=True)
after_enable = snapshot()
changed = sum(1 for k, v in after_enable.items() if k in before and before[k] is not v)
cpu_backend.disable()
after = snapshot()
# attributes that existed must be the same objects; new ones may only be modules imported meanwhile
diff = sorted(k for k in set(before) | set(after)
              if k[0] in {n for n, _ in before} and (k not in after or (k in before and before[k] is not after[k])
                  or (k not in before and not isinstance(after[k], types.ModuleType))))
print("DIFFS", diff[:5])
print("CHANGED", changed, "DIFF", len(diff), "ENV", dict(os.environ) == env)
print("TYPE", torch.zeros(1).type(), "ENABLED", cpu_backend.is_enabled())
try:
    torch.cuda.current_device(); print("CURRENT_DEVICE ok")
except Exception:
    print("CURRENT_DEVICE raises")
cpu_backend.enable()
print("AGAIN", cpu_backend.is_enabled(), torch.zeros(1).type())
'''
    out = _python(code)
    assert "DIFF 0 ENV True" in out.stdout, out.stdout + out.stderr[-3000:]
    changed = int(out.stdout.split("CHANGED ")[1].split()[0])
    assert changed >= 20, out.stdout       # it did change things while enabled
    assert "TYPE torch.FloatTensor ENABLED False" in out.stdout
    assert "CURRENT_DEVICE raises" in out.stdout
    assert "AGAIN True torch.cuda.FloatTensor" in out.stdout


def test_training_keeps_freed_memory_in_the_heap_until_disabled():
    """keep_freed_memory: with glibc's defaults a loop that allocates and frees tensors of mixed sizes
    (as a training step does) page-faults its memory back in every time; under enable(training=True)
    the freed memory stays in the heap (no faults); disable() gives glibc its start-up thresholds back
    (faults again)."""
    code = r'''
import random, resource, torch
from megatron_dsv3 import cpu_backend
def churn():
    rnd = random.Random(0)
    churn_once = lambda: [torch.ones(rnd.randint(30_000, 800_000)) for _ in range(60)]
    churn_once()                                   # first touch of the heap's pages, not counted
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        churn_once()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
default = churn()
cpu_backend.enable(training=True)
enabled = churn()
cpu_backend.disable()
print("FAULTS", default, enabled, churn())
'''
    out = _python(code)
    default, enabled, disabled = map(int, out.stdout.split("FAULTS")[1].split())
    pages = 10 * 60 * 30_000 * 4 // 4096          # at least the smallest tensors' pages, each round
    assert default > pages and disabled > pages, out.stdout
    assert enabled < pages // 100, out.stdout


def test_changed_megatron_source_is_refused_with_the_patch_named():
    """The run-time safety net: a fingerprinted Megatron function whose source differs (here the
    source lookup answers an edited copy) makes enable() refuse before changing anything, naming the
    patch, the version it was written for and the function; the override variable lets it through
    with a warning."""
    code = r'''
import torch
from megatron_dsv3.compat import patches
original = patches.source_of
def edited(target):
    text = original(target)
    if target == "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32":
        text = text.replace("clip_coeff", "clip_coefficient")
    return text
patches.source_of = edited
from megatron_dsv3 import cpu_backend
try:
    cpu_backend.enable()
    print("ENABLED")
except patches.PatchVerificationError as e:
    print("REFUSED", str(e).replace("\n", " | "))
    print("UNTOUCHED", torch.zeros(1).type(), cpu_backend.is_enabled())
'''
    out = _python(code)
    text = out.stdout
    assert "REFUSED" in text, text + out.stderr[-3000:]
    # both patches that pin the function are named (all problems are reported at once)
    assert "'optimizer_cuda_type'" in text and "'cuda_device_literals'" in text
    assert "0.19.2" in text and "clip_grads:clip_grad_by_total_norm_fp32" in text
    assert "MEGATRON_DSV3_UNVERIFIED_PATCHES" in text
    assert "UNTOUCHED torch.FloatTensor False" in text
    forced = _python(code, env={"MEGATRON_DSV3_UNVERIFIED_PATCHES": "1"})
    assert "ENABLED" in forced.stdout, forced.stdout + forced.stderr[-3000:]
    assert "WARNING" in forced.stderr and "clip_grad_by_total_norm_fp32" in forced.stderr


def test_training_patch_fingerprints_refuse_too():
    """The same at the launcher's patches (apply() of patches/)."""
    code = r'''
from megatron_dsv3.compat import patches
from megatron_dsv3.compat.patches import training_log_hook, typing_override
patches.apply([typing_override.PATCH])
original = patches.source_of
patches.source_of = lambda t: original(t) + ("#" if t == training_log_hook.TARGET else "")
try:
    patches.apply([training_log_hook.PATCH]); print("APPLIED")
except patches.PatchVerificationError as e:
    print("REFUSED", e)
'''
    out = _python(code)
    assert "REFUSED" in out.stdout and "'training_log_hook'" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "megatron.training.training:training_log" in out.stdout


def test_refuses_when_cuda_is_present():
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from megatron_dsv3 import cpu_backend\n"
            "try:\n    cpu_backend.enable()\nexcept RuntimeError as e:\n    print('REFUSED', 'force=True' in str(e))\n"
            "cpu_backend.enable(force=True); print('FORCED', cpu_backend.is_enabled())")
    out = _python(code)
    assert "REFUSED True" in out.stdout and "FORCED True" in out.stdout, out.stderr[-2000:]


def test_not_enabled_without_asking():
    out = _python("import megatron_dsv3, megatron_dsv3.hf, megatron_dsv3.spec, megatron_dsv3.training.launcher\n"
                  "from megatron_dsv3 import cpu_backend; print(cpu_backend.is_enabled())")
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_hf_load_says_it_turned_the_backend_on(tmp_path):
    """hf.load without CUDA switches the backend on for the process and says so once on stderr."""
    code = ("import torch\nfrom megatron_dsv3 import hf\nfrom megatron_dsv3.config import DSv3Config\n"
            "from megatron_dsv3.parallel.world import ensure_world\n"
            "ensure_world(); ensure_world()\n"
            "from megatron_dsv3 import cpu_backend; print('ENABLED', cpu_backend.is_enabled())")
    out = _python(code)
    assert "ENABLED True" in out.stdout, out.stderr[-2000:]
    assert out.stderr.count("turned on the CPU backend") == 1
    assert "cpu_backend.disable()" in out.stderr


def test_stock_megatron_gpt_script_trains_on_cpu(tmp_path):
    """Megatron-Core's own GPTModel (local spec) in a pretrain_gpt-style script with no megatron-dsv3
    code, on 2 gloo ranks with TP2, run through the CPU backend's runner; bf16 is refused by name."""
    args = ["-m", "megatron_dsv3.cpu_backend", os.path.join(ROOT, "examples", "megatron_gpt_on_cpu.py")]
    flags = ["--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "64",
             "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3",
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--eval-iters", "0",
             "--eval-interval", "1000", "--log-interval", "1"]
    code, log = launch(2, flags, entry=args, env={"MEGATRON_DSV3_CPU": "0"}, torchrun=True)   # as users run it
    assert code == 0, log[-5000:]
    losses = [float(line.split("lm loss:")[1].split("|")[0]) for line in log.splitlines() if "lm loss:" in line]
    assert len(losses) == 4 and all(np.isfinite(losses)), log[-3000:]
    code, log = launch(1, flags[2:] + ["--bf16"], entry=args, env={"MEGATRON_DSV3_CPU": "0"}, torchrun=True)
    assert code != 0 and "--bf16" in log and "CPU backend" in log, log[-3000:]
