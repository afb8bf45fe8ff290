import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("MEGATRON_DSV3_CPU", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cpu_world():
    """A single-process gloo world with Megatron's model-parallel state (TP=EP=PP=1)."""
    from megatron_dsv3 import cpu_backend
    from megatron_dsv3.parallel.world import init_model_parallel, init_world

    cpu_backend.enable()
    init_world(0, 1)
    init_model_parallel()
    yield


@pytest.fixture
def no_process_groups(monkeypatch):
    """Building any process group (torch.distributed or Megatron's model-parallel state) is a test
    failure: launch checks must refuse before any exists."""
    import torch
    from megatron.core import parallel_state

    def refuse(*args, **kwargs):
        raise AssertionError("a process group was built during the launch checks")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "new_group", refuse)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", refuse)


@pytest.fixture
def set_gemm_mode():
    """megatron_dsv3.model.gemm.set_mode, with the process's mode restored afterwards."""
    from megatron_dsv3.model import gemm

    before = gemm.mode()
    yield gemm.set_mode
    gemm.set_mode(before)
