"""CPU backend: run Megatron-Core 0.19.2 (and its ``megatron.training`` loop) on CPU with gloo.

This is the ONE place in megatron-dsv3 that changes Megatron-Core's behaviour for CPUs. It is opt-in
and reversible:

    from megatron_dsv3 import cpu_backend
    cpu_backend.enable()                 # Megatron-Core models, parallel state, optimizer, checkpoints
    cpu_backend.enable(training=True)    # ... and megatron.training's pretrain loop (any script)
    cpu_backend.disable()                # every torch / Megatron attribute back as it was

    torchrun --nproc-per-node 4 -m megatron_dsv3.cpu_backend my_pretrain_gpt.py <Megatron-LM flags>

``MEGATRON_DSV3_CPU=1`` asks for it in megatron-dsv3's own entry points (the launcher, ``hf.load``).
When CUDA is available, :func:`enable` refuses unless ``force=True``, so a GPU job never silently runs
on the CPU path.

Every change is a named :class:`~megatron_dsv3.compat.patches.Patch`: a small function plus the
fingerprint (sha1 of the source) of each Megatron-Core function it replaces, calls into, or is called
from on the paths our runs take. :func:`enable` verifies them against the installed Megatron-Core
BEFORE changing anything and refuses, naming the patch and the function, when they differ (see
``megatron_dsv3/compat/patches/__init__.py``). No global interception: nothing runs on torch calls
that do not name a CUDA device.

The patches (``../shared/megatron-core-cpu.md`` measured why each exists):

- ``cuda_rng_on_cpu``        the TP "CUDA" RNG tracker keeps CPU generator states (and its warning that
                             the CPU state changed inside a fork, always true here, is dropped).
- ``cuda_current_device``    ``torch.cuda.current_device()`` answers the CPU device (it is passed as
                             ``device=`` throughout Megatron-Core, also inside backward passes).
- ``cuda_tensor_methods``    ``Tensor.cuda()`` / ``Module.cuda()`` keep the CPU (on a CPU-only torch
                             they raise); ``Tensor.record_stream`` is a no-op.
- ``cuda_device_literals``   the Megatron modules that create tensors with a literal ``device="cuda"``
                             see a ``torch`` whose tensor factories map a CUDA device to the CPU
                             (:class:`CpuTorch`; those modules only, nothing else changes).
- ``cuda_streams_noop``      CUDA streams/events/synchronize become no-op stand-ins.
- ``dispatcher_splits_numpy`` the all-to-all dispatcher's split sizes become numpy arrays on CPU too
                             (gloo's all_to_all_single rejects tensors as split sizes).
- ``optimizer_cuda_type``    ``tensor.type()`` answers ``torch.cuda.*Tensor`` for CPU tensors while
                             the optimizer and grad clipping compare it against CUDA type names.

Training-loop patches (``enable(training=True)``, which also applies ``typing_override`` and
``dataset_helpers`` from ``patches/``: megatron.training cannot start from the wheel without them):

- ``pretrain_without_cuda``  ``initialize_megatron`` asserts CUDA and only builds the model-parallel
                             groups and seeds the RNG tracker when ``torch.cuda.device_count() > 0``:
                             it runs with ``allow_no_cuda`` and sees one (CPU) device while it runs.
- ``data_loader_generator``  every ``iter(DataLoader)`` draws its base seed from the default generator,
                             which on CPU is also the "CUDA" one (dropout): each loader gets its own
                             generator seeded from ``--seed``, so resumed runs draw dropout masks exactly
                             as uninterrupted ones.
- ``device_arch_version``    ``validate_args`` asks the GPU architecture when TP > 1: on CPU it is 0
                             (pre-Hopper rules: ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set).
- ``cpu_arguments``          Megatron's ``validate_args`` first applies :data:`CPU_SETTINGS` (gloo,
                             local layers, fp32, CPU initialisation, fusions off); a flag given with
                             another value is an error naming it.

One process setting comes with ``enable(training=True)`` (not a Megatron patch):

- ``keep_freed_memory``      glibc's malloc keeps freed blocks in the process heap (:data:`MALLOC_KEEP`)
                             instead of handing each large one back to the kernel. With its defaults
                             every training step frees the step's activations, glibc returns them
                             (``munmap`` / heap trim), and the next step page-faults them back in: ~9,000
                             minor faults per step of the quickstart model, 12-15% of the process's
                             time in the kernel. Not glibc (musl, macOS): nothing changes. ``disable()``
                             sets glibc's start-up thresholds back (128 KiB; glibc's own later raising
                             of the mmap threshold is not restored).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import types

import torch

from .patches import Patch, apply, check_fingerprints as _check, resolve, revert

ENV_VAR = "MEGATRON_DSV3_CPU"
_CPU = torch.device("cpu")

# --------------------------------------------------------------------------------------------
# THE CPU settings: (Megatron-LM argument, its value, Megatron-Core config field, its value)
# --------------------------------------------------------------------------------------------
CPU_SETTINGS: tuple[tuple, ...] = (
    ("distributed_backend", "gloo", None, None),
    ("transformer_impl", "local", "transformer_impl", "local"),
    ("use_cpu_initialization", True, "use_cpu_initialization", True),
    ("bf16", False, "bf16", False),
    ("fp16", False, "fp16", False),
    (None, None, "params_dtype", torch.float32),
    ("gradient_accumulation_fusion", False, "gradient_accumulation_fusion", False),
    ("no_persist_layer_norm", True, "persist_layer_norm", False),
    ("apply_rope_fusion", False, "apply_rope_fusion", False),
    ("bias_dropout_fusion", False, "bias_dropout_fusion", False),
    ("bias_swiglu_fusion", False, "bias_activation_fusion", False),
    ("masked_softmax_fusion", False, "masked_softmax_fusion", False),
    ("cross_entropy_loss_fusion", False, "cross_entropy_loss_fusion", False),
    ("moe_permute_fusion", False, "moe_permute_fusion", False),
    ("moe_router_fusion", False, "moe_router_fusion", False),
    ("moe_grouped_gemm", False, "moe_grouped_gemm", False),
)


def cpu_core_settings() -> dict:
    """{Megatron-Core config field: value} of :data:`CPU_SETTINGS`."""
    return {core: value for _, _, core, value in CPU_SETTINGS if core is not None}


def cpu_arg_settings() -> dict:
    """{Megatron-LM argument: value} of :data:`CPU_SETTINGS`."""
    return {arg: value for arg, value, _, _ in CPU_SETTINGS if arg is not None}


class CpuSettingError(ValueError):
    """A Megatron-LM flag given with a value the CPU backend cannot run; the message names it."""


def apply_cpu_settings(args: argparse.Namespace, given=None, defaults=None) -> list[str]:
    """Set :data:`CPU_SETTINGS` on Megatron-LM ``args``; returns the flags it changed.

    A setting the user chose explicitly with another value is refused: ``given`` is the set of
    argument names given on the command line, or None to treat every value that differs from
    Megatron's parser default (``defaults``, {dest: default}) as chosen.
    """
    changed = []
    for dest, value, _, _ in CPU_SETTINGS:
        if dest is None or getattr(args, dest, value) == value:
            continue
        chosen = dest in given if given is not None else getattr(args, dest) != (defaults or {}).get(dest)
        flag = "--" + dest.replace("_", "-")
        if chosen:
            raise CpuSettingError(f"{flag} {getattr(args, dest)!r}: the CPU backend runs with {dest}={value!r} "
                                  f"(gloo, local layers, fp32, fusions off); drop {flag}")
        setattr(args, dest, value)
        changed.append(dest)
    return changed


# --------------------------------------------------------------------------------------------
# cuda_rng_on_cpu
# --------------------------------------------------------------------------------------------
class _DropSameGeneratorWarning(logging.Filter):
    """On CPU the "CUDA" and CPU generators are one: the tracker's fork always changes the CPU state."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in str(record.msg)


def _install_rng(patch: Patch) -> None:
    from megatron.core.tensor_parallel import random as tp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    patch.set(tp_random, "_get_cuda_rng_state", get_state)
    patch.set(tp_random, "_set_cuda_rng_state", set_state)
    patch.set(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    patch.set(torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    patch.set(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    patch.set(logger, "filters", [*logger.filters, _DropSameGeneratorWarning()])


# --------------------------------------------------------------------------------------------
# cuda_current_device
# --------------------------------------------------------------------------------------------
def _install_current_device(patch: Patch) -> None:
    # A device, not the ordinal 0: torch reads an int device as CUDA.
    patch.set(torch.cuda, "current_device", lambda: _CPU)
    patch.set(torch.cuda, "set_device", lambda device: None)


# --------------------------------------------------------------------------------------------
# cuda_tensor_methods
# --------------------------------------------------------------------------------------------
def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


def _module_cuda(self, device=None):
    return self


def _install_tensor_methods(patch: Patch) -> None:
    patch.set(torch.Tensor, "cuda", _tensor_cuda)
    patch.set(torch.Tensor, "record_stream", lambda self, stream: None)
    patch.set(torch.nn.Module, "cuda", _module_cuda)


# --------------------------------------------------------------------------------------------
# cuda_device_literals
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


_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
              "randint", "zeros_like", "ones_like", "empty_like", "full_like")


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return factory


class CpuTorch(types.ModuleType):
    """What the name ``torch`` means inside a Megatron module that creates tensors on a literal CUDA
    device: the real torch module, except that its tensor factories put such tensors on the CPU."""

    def __init__(self):
        super().__init__("torch", "torch, with CUDA tensor factories mapped to the CPU (megatron-dsv3)")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


#: Megatron modules with ``device="cuda"`` literals on the paths our runs take (the fingerprints of
#: the two patches below pin the functions holding them).
CORE_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
    "megatron.core.transformer.utils",       # Megatron's own attention (a stock GPTModel)
)
TRAINING_LITERAL_MODULES = (
    "megatron.training.training",
    "megatron.training.checkpointing",
    "megatron.training.initialize",
)
_PROXY = CpuTorch()


def _proxy_modules(names):
    def install(patch: Patch) -> None:
        import importlib

        for name in names:
            patch.set(importlib.import_module(name), "torch", _PROXY)

    return install


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


def _install_streams(patch: Patch) -> None:
    patch.set(torch.cuda, "Stream", _NoopStream)
    patch.set(torch.cuda, "Event", _NoopEvent)
    patch.set(torch.cuda, "current_stream", lambda device=None: _NoopStream())
    patch.set(torch.cuda, "default_stream", lambda device=None: _NoopStream())
    patch.set(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())
    patch.set(torch.cuda, "synchronize", lambda device=None: None)


# --------------------------------------------------------------------------------------------
# dispatcher_splits_numpy
# --------------------------------------------------------------------------------------------
def _install_dispatcher_splits(patch: Patch) -> None:
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.detach().cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    patch.set(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


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


def _install_tensor_type(patch: Patch) -> None:
    patch.set(torch.Tensor, "type", _tensor_type)


PATCHES: list[Patch] = [
    Patch("cuda_rng_on_cpu", "tensor_parallel.random reads/writes CUDA generator states",
          _install_rng,
          {
            "megatron.core.tensor_parallel.random:_get_cuda_rng_state": "b8efb24fab54",
            "megatron.core.tensor_parallel.random:_set_cuda_rng_state": "15a863ab8e24",
            "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork": "043757ad2810",
            "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add": "998829443049",
            "megatron.core.tensor_parallel.random:model_parallel_cuda_manual_seed": "a4fc4526516c",
        }),
    Patch("cuda_current_device", "torch.cuda.current_device() is passed as device= throughout Megatron-Core",
          _install_current_device,
          {
            "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__": "23716e86a95d",
            "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate": "fbdfa3f9f80b",
            "megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication.backward": "5876faa049dc",
            "megatron.core.tensor_parallel.mappings:_AllToAll.forward": "0e8104452eff",
            "megatron.core.tensor_parallel.mappings:_gather_along_first_dim": "30582a7d8b1f",
            "megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim": "c109f4a6c0a9",
            "megatron.core.timers:Timers._get_elapsed_time_all_ranks": "bf3401aa3839",
            "megatron.core.transformer.multi_token_prediction:MTPLossLoggingHelper.save_metrics_to_tracker": "a86378f9b9eb",
            "megatron.core.utils:GlobalMemoryBuffer.get_tensor": "edae0b60303c",
            "megatron.core.dist_checkpointing.strategies.state_dict_saver:save_state_dict_async_finalize": "40d7f8faeb9e",
        }),
    Patch("cuda_tensor_methods", "Tensor.cuda() / Module.cuda() / record_stream in model set-up and the training loop",
          _install_tensor_methods,
          {
            "megatron.core.models.common.language_module.language_module:LanguageModule.setup_embeddings_and_output_layer": "0485fb400b47",
        }),
    Patch("cuda_device_literals", "device='cuda' literals in schedules, grad clipping, the optimizer and the rerun machine",
          _proxy_modules(CORE_LITERAL_MODULES),
          {
            "megatron.core.pipeline_parallel.schedules:forward_backward_no_pipelining": "631c330841c5",
            "megatron.core.pipeline_parallel.schedules:forward_backward_pipelining_with_interleaving": "23b55d9fe41f",
            "megatron.core.pipeline_parallel.schedules:forward_backward_pipelining_without_interleaving": "136f15effe89",
            "megatron.core.optimizer.clip_grads:get_grad_norm_fp32": "f695db125f8f",
            "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32": "2e6807ce3b31",
            "megatron.core.optimizer.optimizer:FP32Optimizer.__init__": "fc56e31c7075",
            "megatron.core.optimizer.optimizer:MegatronOptimizer.has_grad_norm_group": "76e22a1ab46b",
            "megatron.core.rerun_state_machine:RerunStateMachine._reduce_any": "ad4b7433c47c",
            "megatron.core.transformer.utils:get_default_causal_mask": "975f25e5c768",
            "megatron.core.fusions.fused_softmax:FusedScaleMaskSoftmax.forward_torch_softmax": "f34c4734f72f",
            "megatron.core.utils:local_multi_tensor_l2_norm": "6b06d00fafcd",
        }),
    Patch("cuda_streams_noop", "CUDA streams/events in the all-to-all dispatcher, DDP, p2p and timers",
          _install_streams,
          {
            "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.__init__": "dfaab400dda3",
            "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize": "8108d82d8feb",
            "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync": "02a8c88a0054",
            "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate": "fbdfa3f9f80b",
            "megatron.core.timers:Timer.start": "448f038a37e6",
            "megatron.core.timers:Timer.stop": "523a967abe65",
            "megatron.core.dist_checkpointing.strategies.filesystem_async:FileSystemWriterAsync.preload_tensors": "671c569804e1",
        }),
    Patch("dispatcher_splits_numpy", "split sizes stay tensors on CPU, which gloo's all_to_all_single rejects",
          _install_dispatcher_splits,
          {
            "megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu": "547dda81e5df",
            "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize": "8108d82d8feb",
        }),
    Patch("optimizer_cuda_type", "the optimizer and clip_grads compare tensor.type() with 'torch.cuda.FloatTensor'",
          _install_tensor_type,
          {
            "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32": "2e6807ce3b31",
            "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__": "50260bae150e",
            "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups": "fe95b163d28f",
            "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__": "efbfdf3e2dd0",
        }),
]


# --------------------------------------------------------------------------------------------
# Training-loop patches
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_cpu_device():
    count = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1
    try:
        yield
    finally:
        torch.cuda.device_count = count


def _install_initialize_megatron(patch: Patch) -> None:
    from megatron.training import training

    original = resolve("megatron.training.initialize:initialize_megatron")

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        with _one_cpu_device():
            return original(*args, **kwargs)

    patch.set(training, "initialize_megatron", initialize_megatron)


def _install_data_loader_generator(patch: Patch) -> None:
    from megatron.training import get_args, training

    original = resolve("megatron.training.datasets.data_samplers:build_pretraining_data_loader")

    @functools.wraps(original)
    def build_pretraining_data_loader(dataset, consumed_samples):
        loader = original(dataset, consumed_samples)
        if loader is not None:
            loader.generator = torch.Generator().manual_seed(get_args().seed)
        return loader

    patch.set(training, "build_pretraining_data_loader", build_pretraining_data_loader)


def _install_device_arch(patch: Patch) -> None:
    from megatron.training import arguments

    patch.set(arguments, "get_device_arch_version", lambda: 0)


def megatron_arg_defaults() -> dict:
    """{argument: default} of Megatron-LM's own parser."""
    from megatron.training import arguments

    parser = arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def _install_cpu_arguments(patch: Patch) -> None:
    from megatron.training import arguments, initialize

    original = resolve("megatron.training.arguments:validate_args")
    defaults = megatron_arg_defaults()

    @functools.wraps(original)
    def validate_args(args, defaults_=None, *rest, **kwargs):
        try:
            apply_cpu_settings(args, given=getattr(args, "dsv3_given", None), defaults=defaults)
        except CpuSettingError as err:
            raise SystemExit(f"megatron-dsv3 CPU backend: {err}") from None
        if defaults_ is None:
            return original(args, *rest, **kwargs)
        return original(args, defaults_, *rest, **kwargs)

    patch.set(arguments, "validate_args", validate_args)
    patch.set(initialize, "validate_args", validate_args)


TRAINING_PATCHES: list[Patch] = [
    Patch("cuda_device_literals_training", "device='cuda' literals in the training loop and its "
          "checkpointing; the training loop's call sites of the patches above",
          _proxy_modules(TRAINING_LITERAL_MODULES),
          {
            "megatron.training.training:pretrain": "49596e6f0eee",
            "megatron.training.training:training_log": "02a4e7b41dea",
            "megatron.training.training:build_train_valid_test_data_loaders": "31f5bffad207",
            "megatron.training.training:evaluate": "e21250873fb0",
            "megatron.training.training:get_model": "d406c8feb0b7",
            "megatron.training.checkpointing:read_metadata": "373ae63fc67f",
            "megatron.training.initialize:_warmup_jit_function": "8e7cd03a9f0c",
            "megatron.training.utils.common_utils:logical_and_across_model_parallel_group": "f3390356f5f1",
            "megatron.training.utils.common_utils:reduce_max_stat_across_model_parallel_group": "4489c8e2d746",
        }),
    Patch("pretrain_without_cuda", "initialize_megatron asserts CUDA; groups and RNG tracker are set up "
          "only if device_count() > 0", _install_initialize_megatron,
          {"megatron.training.initialize:initialize_megatron": "9aade6445a76",
           "megatron.training.initialize:_initialize_distributed": "2d35a7d2bdc2",
           "megatron.training.initialize:_set_random_seed": "dfebce4bdd82",
           "megatron.training.training:pretrain": "49596e6f0eee"}),
    Patch("data_loader_generator", "on CPU the 'CUDA' generator is the CPU default generator, from which every "
          "iter(DataLoader) draws its base seed: a resumed run would draw at another point of the dropout "
          "stream", _install_data_loader_generator,
          {"megatron.training.datasets.data_samplers:build_pretraining_data_loader": "136fe150dcbc",
           "megatron.training.training:build_train_valid_test_data_loaders": "31f5bffad207"}),
    Patch("device_arch_version", "validate_args reads the GPU architecture when TP > 1", _install_device_arch,
          {"megatron.training.utils.common_utils:get_device_arch_version": "1c0d596af5b2",
           "megatron.training.arguments:validate_args": "702f3a4a50c4"}),
    Patch("cpu_arguments", "a stock script's arguments ask for NCCL, Transformer Engine, bf16 and fused "
          "kernels", _install_cpu_arguments,
          {"megatron.training.arguments:validate_args": "702f3a4a50c4",
           "megatron.training.initialize:initialize_megatron": "9aade6445a76"}),
]

_STATE = {"enabled": False, "training": False, "env": {}}


def is_enabled() -> bool:
    return _STATE["enabled"]


def requested() -> bool:
    """True when the environment asks for the CPU backend (``MEGATRON_DSV3_CPU=1``)."""
    return os.environ.get(ENV_VAR, "0").lower() in ("1", "true", "yes")


def _setenv(name: str, value: str) -> None:
    _STATE["env"].setdefault(name, os.environ.get(name))
    os.environ[name] = value


#: glibc ``mallopt`` parameters set by ``keep_freed_memory``: (parameter number, value while enabled).
#: 32 MiB is the largest mmap threshold glibc accepts; blocks above it still go straight to the kernel.
MALLOC_KEEP = {"M_TRIM_THRESHOLD": (-1, 256 << 20), "M_MMAP_THRESHOLD": (-3, 32 << 20)}
GLIBC_START_THRESHOLD = 128 << 10


def _mallopt():
    """glibc's ``mallopt``, or None when the C library is not glibc."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version      # glibc only
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc.mallopt


def keep_freed_memory(keep: bool) -> bool:
    """``keep_freed_memory`` (see the module doc): True when glibc took the setting, False when the C
    library is not glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    for name, (param, value) in MALLOC_KEEP.items():
        if mallopt(param, value if keep else GLIBC_START_THRESHOLD) != 1:
            raise RuntimeError(f"glibc mallopt({name}, {value if keep else GLIBC_START_THRESHOLD}) failed")
    return True


def enable(force: bool = False, training: bool = False) -> None:
    """Verify and apply the Megatron-Core patches (idempotent; see the module doc).

    Args:
        force: allow enabling while CUDA is available (otherwise a clear error).
        training: also patch ``megatron.training`` (its pretrain loop and argument validation).
    """
    if not _STATE["enabled"]:
        if torch.cuda.is_available() and not force:
            raise RuntimeError(
                "megatron_dsv3.cpu_backend.enable(): CUDA is available, so the CPU backend stays off. "
                "Unset MEGATRON_DSV3_CPU / drop --cpu to train on the GPUs, or call enable(force=True) "
                "to run on the CPU anyway.")
        if "transformer_engine" in sys.modules:
            raise RuntimeError("the CPU backend cannot run with Transformer Engine imported")
        if "TORCHDYNAMO_DISABLE" not in os.environ:
            _setenv("TORCHDYNAMO_DISABLE", "1")
        apply(PATCHES)
        _STATE["enabled"] = True
    if training and not _STATE["training"]:
        from .patches import dataset_helpers, typing_override

        # what megatron.training needs to start from the wheel at all (Python 3.11, no Makefile);
        # disable() reverts the ones applied here
        startup = [p for p in (typing_override.PATCH, dataset_helpers.PATCH) if not p.applied]
        apply(startup)
        _STATE["startup"] = startup
        _setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        apply(TRAINING_PATCHES)
        _STATE["malloc"] = keep_freed_memory(True)
        _STATE["training"] = True


def disable() -> None:
    """Undo :func:`enable`: every torch / Megatron attribute and environment variable it changed."""
    if _STATE.pop("malloc", False):
        keep_freed_memory(False)
    revert(TRAINING_PATCHES)
    revert(_STATE.get("startup", []))
    revert(PATCHES)
    for name, old in _STATE["env"].items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
    _STATE.update(enabled=False, training=False, env={}, startup=[])


def check_fingerprints() -> dict[str, tuple[str, str]]:
    """Targets whose source differs from the pinned version: {target: (expected, found)}."""
    from .patches import apply as apply_patches, typing_override

    apply_patches([typing_override.PATCH])  # the training targets live in megatron.training
    return _check(PATCHES + TRAINING_PATCHES)


def main(argv=None) -> None:
    """``python -m megatron_dsv3.cpu_backend SCRIPT [ARGS...]``: run a Megatron training script on CPU."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    enable(training=True)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
