"""The CPU backend: every patch is named, fingerprinted against Megatron-Core 0.19.2, and works."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from megatron_dsv3 import cpu_backend


def test_every_patch_targets_unchanged_megatron_source(cpu_world):
    import megatron.core

    assert megatron.core.__version__.split("+")[0] == "0.19.2"
    assert cpu_backend.check_fingerprints() == {}, "Megatron-Core changed under a CPU patch: re-check it"
    names = [p.name for p in cpu_backend.PATCHES]
    assert len(names) == len(set(names)) and all(p.targets and p.why for p in cpu_backend.PATCHES)


def test_patches_behave(cpu_world):
    assert cpu_backend.is_enabled()
    # cuda_devices_to_cpu and cuda_current_device
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu" and torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
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


def test_refuses_when_cuda_is_present():
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from megatron_dsv3 import cpu_backend\n"
            "try:\n    cpu_backend.enable()\nexcept RuntimeError as e:\n    print('REFUSED', 'force=True' in str(e))\n"
            "cpu_backend.enable(force=True); print('FORCED', cpu_backend.is_enabled())")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TORCHDYNAMO_DISABLE": "1"}, timeout=300)
    assert "REFUSED True" in out.stdout and "FORCED True" in out.stdout, out.stderr[-2000:]


def test_not_enabled_without_asking():
    code = "import megatron_dsv3, megatron_dsv3.hf, megatron_dsv3.spec; from megatron_dsv3 import cpu_backend; print(cpu_backend.is_enabled())"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "MEGATRON_DSV3_CPU"}, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
