"""CPU backend: run Megatron-Core 0.19.2 on CPU with gloo.

This is the ONE place in megatron-dsv3 that changes Megatron-Core's behaviour for CPUs. It is opt-in:
nothing happens until :func:`enable` is called (the launcher and tests call it when
``MEGATRON_DSV3_CPU=1`` is set or ``--cpu`` is passed). When CUDA is available, :func:`enable`
refuses unless ``force=True``, so a GPU job never silently runs on the CPU path.

Every change is a named :class:`Patch`: a small function plus the fingerprint (a hash of the source)
of each Megatron-Core / torch object it replaces or relies on, as seen in the pinned versions.
``tests/test_cpu_backend.py`` checks every fingerprint, so a Megatron-Core upgrade that moves the
ground under a patch fails loudly instead of silently running unpatched code.

The patches (see ``../shared/megatron-core-cpu.md`` for why each exists):

- ``cuda_rng_on_cpu``        the "CUDA" RNG tracker keeps CPU generator states.
- ``cuda_current_device``    ``torch.cuda.current_device()`` answers the CPU device (it is used as
                             ``device=`` throughout, also in backward passes).
- ``cuda_devices_to_cpu``    a TorchFunctionMode maps every CUDA device argument, ``.cuda()`` and
                             ``.to("cuda")`` to the CPU.
- ``cuda_streams_noop``      CUDA streams/events/synchronize become no-op stand-ins.
- ``dispatcher_splits_numpy`` the all-to-all dispatcher's split sizes become numpy arrays on CPU too
                             (gloo's all_to_all_single rejects tensors as split sizes).
- ``optimizer_cuda_type``    ``tensor.type()`` answers ``torch.cuda.*Tensor`` for CPU tensors while
                             the optimizer and grad clipping compare it against CUDA type names.

Training-loop patches (:func:`enable_training`, applied by the launcher after :func:`enable`):

- ``pretrain_without_cuda``  ``initialize_megatron`` asserts CUDA and only builds the model-parallel
                             groups and seeds the RNG tracker when ``torch.cuda.device_count() > 0``:
                             it runs with ``allow_no_cuda`` and sees one (CPU) device while it runs.
- ``device_arch_version``    ``validate_args`` asks the GPU architecture when TP > 1: on CPU it is 0
                             (pre-Hopper rules: the launcher sets ``CUDA_DEVICE_MAX_CONNECTIONS=1``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

from .patches import Patch, apply, check_fingerprints as _check, resolve

ENV_VAR = "MEGATRON_DSV3_CPU"
_CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# cuda_rng_on_cpu
# --------------------------------------------------------------------------------------------
def _patch_rng():
    from megatron.core.tensor_parallel import random as tp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


# --------------------------------------------------------------------------------------------
# cuda_current_device
# --------------------------------------------------------------------------------------------
def _patch_current_device():
    # A device, not the ordinal 0: torch reads an int device as CUDA, and code inside autograd
    # Functions' backward runs outside the TorchFunctionMode below (a mode is off while it handles
    # Tensor.backward), so ``device=torch.cuda.current_device()`` must already mean the CPU.
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.set_device = lambda device: None


# --------------------------------------------------------------------------------------------
# cuda_devices_to_cpu
# --------------------------------------------------------------------------------------------
def _is_cuda(dev) -> bool:
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True  # an integer device is a CUDA ordinal
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices in any torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_MODE: CudaToCpuMode | None = None


def _patch_devices():
    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()


# --------------------------------------------------------------------------------------------
# cuda_streams_noop
# --------------------------------------------------------------------------------------------
class _NoopStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NoopEvent()

    def synchronize(self):
        pass


class _NoopEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _patch_streams():
    torch.cuda.Stream = _NoopStream
    torch.cuda.Event = _NoopEvent
    torch.cuda.current_stream = lambda device=None: _NoopStream()
    torch.cuda.default_stream = lambda device=None: _NoopStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


# --------------------------------------------------------------------------------------------
# dispatcher_splits_numpy
# --------------------------------------------------------------------------------------------
def _patch_dispatcher_splits():
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.detach().cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# --------------------------------------------------------------------------------------------
# optimizer_cuda_type
# --------------------------------------------------------------------------------------------
_ORIG_TENSOR_TYPE = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        name = _ORIG_TENSOR_TYPE(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _patch_tensor_type():
    torch.Tensor.type = _tensor_type


PATCHES: list[Patch] = [
    Patch(
        "cuda_rng_on_cpu",
        "tensor_parallel.random reads/writes CUDA generator states",
        _patch_rng,
        {
            "megatron.core.tensor_parallel.random:_get_cuda_rng_state": "b8efb24fab54",
            "megatron.core.tensor_parallel.random:_set_cuda_rng_state": "15a863ab8e24",
            "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork": "043757ad2810",
        },
    ),
    Patch(
        "cuda_current_device",
        "torch.cuda.current_device() is passed as device= throughout Megatron-Core",
        _patch_current_device,
        {"megatron.core.transformer.moe.router:TopKRouter.__init__": "e4f037bea518"},
    ),
    Patch(
        "cuda_devices_to_cpu",
        "literal device='cuda', .cuda() and .to('cuda') in schedules, p2p, DDP, optimizer, MoE",
        _patch_devices,
        {"megatron.core.transformer.moe.router:Router.gating": "0249a9cf7367"},
    ),
    Patch(
        "cuda_streams_noop",
        "CUDA streams/events in the all-to-all dispatcher and overlap code",
        _patch_streams,
        {"megatron.core.transformer.moe.moe_layer:MoELayer.setup_delayed_wgrad_for_dispatch_backward_overlap": "db7caeadc193"},
    ),
    Patch(
        "dispatcher_splits_numpy",
        "split sizes stay tensors on CPU, which gloo's all_to_all_single rejects",
        _patch_dispatcher_splits,
        {"megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu": "547dda81e5df"},
    ),
    Patch(
        "optimizer_cuda_type",
        "the optimizer and clip_grads compare tensor.type() with 'torch.cuda.FloatTensor'",
        _patch_tensor_type,
        {
            "megatron.core.optimizer.clip_grads:get_grad_norm_fp32": "f695db125f8f",
        },
    ),
]

# --------------------------------------------------------------------------------------------
# pretrain_without_cuda (training loop)
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_cpu_device():
    count = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1
    try:
        yield
    finally:
        torch.cuda.device_count = count


def _patch_initialize_megatron():
    from megatron.training import training

    original = resolve("megatron.training.initialize:initialize_megatron")

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        with _one_cpu_device():
            return original(*args, **kwargs)

    training.initialize_megatron = initialize_megatron


def _patch_device_arch():
    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 0


TRAINING_PATCHES: list[Patch] = [
    Patch(
        "pretrain_without_cuda",
        "initialize_megatron asserts CUDA; groups and RNG tracker are set up only if device_count() > 0",
        _patch_initialize_megatron,
        {
            "megatron.training.initialize:initialize_megatron": "9aade6445a76",
            "megatron.training.initialize:_initialize_distributed": "2d35a7d2bdc2",
            "megatron.training.initialize:_set_random_seed": "dfebce4bdd82",
        },
    ),
    Patch(
        "device_arch_version",
        "validate_args reads the GPU architecture when TP > 1",
        _patch_device_arch,
        {
            "megatron.training.utils.common_utils:get_device_arch_version": "1c0d596af5b2",
            "megatron.training.arguments:validate_args": "702f3a4a50c4",
        },
    ),
]

_ENABLED = False


def is_enabled() -> bool:
    return _ENABLED


def requested() -> bool:
    """True when the environment asks for the CPU backend (``MEGATRON_DSV3_CPU=1``)."""
    return os.environ.get(ENV_VAR, "0").lower() in ("1", "true", "yes")


def enable(force: bool = False) -> None:
    """Apply every Megatron-Core patch (idempotent).

    Args:
        force: allow enabling while CUDA is available (otherwise a clear error).
    """
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "megatron_dsv3.cpu_backend.enable(): CUDA is available, so the CPU backend stays off. "
            "Unset MEGATRON_DSV3_CPU / drop --cpu to train on the GPUs, or call enable(force=True) "
            "to run on the CPU anyway."
        )
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if "transformer_engine" in sys.modules:
        raise RuntimeError("the CPU backend cannot run with Transformer Engine imported")
    apply(PATCHES)
    _ENABLED = True


def enable_training() -> None:
    """Also patch megatron.training's start-up for CPU (needs :func:`enable` first)."""
    if not _ENABLED:
        raise RuntimeError("cpu_backend.enable_training() needs cpu_backend.enable() first")
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    apply(TRAINING_PATCHES)


def check_fingerprints() -> dict[str, tuple[str, str]]:
    """Targets whose source differs from the pinned version: {target: (expected, found)}."""
    from .patches import typing_override

    apply([typing_override.PATCH])  # the training targets live in megatron.training
    return _check(PATCHES + TRAINING_PATCHES)
