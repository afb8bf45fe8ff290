"""FP8 launch rules: DeepSeek-V3's recipe (report sec. 3.3) through Transformer Engine (``--fp8-format
e4m3|hybrid --fp8-recipe delayed|tensorwise|blockwise``) or emulated on the local layers
(``--fp8-emulation``). One place for the launch checks (:func:`check_fp8`, called by
``checks.check_launch``) and for the planner (:func:`fp8_flag_problems`, no machine needed).

What runs in FP8 on Transformer Engine (``model/backends.py``'s TE map inside Megatron-Core's
``fp8_autocast``): the MLA projections, dense SwiGLU, routed and shared experts, and the MTP depth's
decoder layer. Kept in BF16: embedding, output head (Megatron-Core's local linear), MoE gate (our
router's own fp32 matmul), RMSNorms (TENorm, no quantised output), attention core (torch SDPA), and the
MTP eh_proj (outside the FP8 context). Transformer Engine needs, per recipe (Megatron-Core 0.19.2's
``fp8_utils.get_fp8_recipe``): delayed any version, tensorwise >= 2.2.0.dev0, blockwise >= 2.3.0.dev0;
FP8 GEMMs need compute capability >= 8.9, TE's blockwise kernels a Hopper-class GPU (TE says which).
"""
from __future__ import annotations

import argparse
from typing import Optional

#: The recipes DeepSeek-V3 training is offered with (the report's is blockwise), and the Transformer
#: Engine version each needs (Megatron-Core 0.19.2, core/fp8_utils.py get_fp8_recipe).
RECIPES = {"delayed": None, "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0"}
#: Schedules whose weight-gradient split replaces the linears' forward (parallel/schedules/wgrad.py).
_WGRAD_SPLIT_SCHEDULES = ("dualpipe", "dualpipev")


def _fmt(args) -> Optional[str]:
    return getattr(args, "fp8", None)


def fp8_flag_problems(args: argparse.Namespace, given: set) -> list[str]:
    """The FP8 flag combinations no machine can run, one message each (flag named, what to do)."""
    out = []
    fmt, recipe = _fmt(args), getattr(args, "fp8_recipe", "delayed")
    emulate = bool(getattr(args, "fp8_emulation", False))
    if "fp8_recipe" in given and fmt is None and not emulate:
        out.append(f"--fp8-recipe {recipe} acts only with --fp8-format e4m3|hybrid (Transformer Engine) or "
                   "--fp8-emulation; give one of them or drop --fp8-recipe")
    if fmt is not None and recipe not in RECIPES:
        out.append(f"--fp8-recipe {recipe}: DeepSeek-V3 training through our specs offers "
                   f"{', '.join(RECIPES)} (the report's is blockwise: 1x128 activation tiles, 128x128 weight "
                   "blocks); use one of them")
    if fmt is not None and emulate:
        out.append("--fp8-emulation with --fp8-format: give one of them (--fp8-format runs real FP8 on "
                   "Transformer Engine, --fp8-emulation emulates the report's recipe on the local layers)")
    if fmt is not None and not emulate and not getattr(args, "cpu", False) \
            and getattr(args, "transformer_impl", "transformer_engine") != "transformer_engine":
        out.append(f"--fp8-format {fmt} with --transformer-impl {args.transformer_impl}: Megatron-Core's local "
                   "layers have no FP8 (the run would silently be BF16); use --transformer-impl "
                   "transformer_engine, or --fp8-emulation to emulate the recipe on the local layers")
    if fmt is not None and recipe == "delayed" and getattr(args, "first_last_layers_bf16", False):
        out.append("--first-last-layers-bf16 with --fp8-recipe delayed: Megatron-Core asserts that delayed "
                   "scaling cannot leave layers in BF16; use --fp8-recipe tensorwise or blockwise, or drop "
                   "--first-last-layers-bf16")
    if getattr(args, "activation_func_fp8_input_store", False) and (fmt is None or emulate):
        out.append("--activation-func-fp8-input-store is Transformer Engine's FP8 cache of the SwiGLU input; give "
                   "--fp8-format (not --fp8-emulation) or drop it")
    if getattr(args, "first_last_layers_bf16", False) and fmt is None:
        out.append("--first-last-layers-bf16 acts only with --fp8-format; give --fp8-format or drop it")
    if emulate:
        if "fp8_recipe" in given and recipe != "blockwise":
            out.append(f"--fp8-recipe {recipe} with --fp8-emulation: the emulation is the report's blockwise "
                       "recipe (e4m3, 1x128 activation tiles, 128x128 weight blocks); give blockwise or drop "
                       "--fp8-recipe")
        if not getattr(args, "cpu", False) and getattr(args, "transformer_impl", "local") != "local":
            out.append("--fp8-emulation replaces Megatron-Core's local linear layers; add --transformer-impl "
                       "local (or use --fp8-format on Transformer Engine for real FP8)")
        if not getattr(args, "cpu", False) and getattr(args, "gradient_accumulation_fusion", False):
            out.append("--fp8-emulation computes its own weight gradients; give --no-gradient-accumulation-fusion")
        schedule = getattr(args, "pipeline_schedule", "1f1b")
        if schedule in _WGRAD_SPLIT_SCHEDULES:
            out.append(f"--fp8-emulation with --pipeline-schedule {schedule}: the schedule's weight-gradient "
                       "split replaces the linears' forward (parallel/schedules/wgrad.py), which would drop the "
                       "emulation; use --pipeline-schedule 1f1b")
        if not getattr(args, "fp8_wgrad", True):
            out.append("--no-fp8-wgrad with --fp8-emulation: the emulation runs Wgrad in FP8 as the report does; "
                       "drop --no-fp8-wgrad")
        if getattr(args, "fp8_param_gather", False):
            out.append("--fp8-param-gather needs Transformer Engine's FP8 parameters; drop it with --fp8-emulation")
    return out


# ----------------------------------------------------------------------------------------------
# The machine: Transformer Engine version and the GPU's FP8 support
# ----------------------------------------------------------------------------------------------
def te_status() -> dict:  # pragma: no cover - depends on the machine (tests monkeypatch it)
    """{'version': str or None, 'min_version': callable(str) -> bool, 'gpu': bool,
    'fp8': (ok, reason), 'blockwise': (ok, reason)} of this machine."""
    import importlib.util

    out = {"version": None, "min_version": lambda v: False, "gpu": False,
           "fp8": (False, "no Transformer Engine"), "blockwise": (False, "no Transformer Engine")}
    if importlib.util.find_spec("transformer_engine") is None:
        return out
    from megatron.core.utils import get_te_version, is_te_min_version

    out["version"] = str(get_te_version())
    out["min_version"] = is_te_min_version
    import torch

    out["gpu"] = torch.cuda.is_available()
    if not out["gpu"]:
        out["fp8"] = out["blockwise"] = (False, "no CUDA device is visible")
        return out
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    out["fp8"] = _te_check(("check_fp8_support",),
                           ((major, minor) >= (8, 9), f"{name} has compute capability {major}.{minor}; FP8 GEMMs "
                                                      "need 8.9 or newer (Ada, Hopper, Blackwell)"))
    out["blockwise"] = _te_check(("check_fp8_block_scaling_support",),
                                 ((major, minor) >= (9, 0), f"{name} has compute capability {major}.{minor}; "
                                                            "blockwise FP8 needs Hopper (9.0) or newer"))
    return out


def _te_check(names, fallback):  # pragma: no cover - GPU only
    """Transformer Engine's own support probe (its module moved between versions), else ``fallback``."""
    import importlib

    for module in ("transformer_engine.pytorch.fp8", "transformer_engine.pytorch.quantization",
                   "transformer_engine.pytorch"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in names:
            fn = getattr(mod, name, None)
            if fn is not None:
                ok, reason = fn()
                return bool(ok), str(reason)
    return fallback


def fp8_machine_problems(args: argparse.Namespace, status: Optional[dict] = None) -> list[str]:
    """What this machine lacks for ``--fp8-format`` (Transformer Engine installed is checked by
    ``checks._check_backend`` before): the recipe's TE version, a GPU, FP8 / blockwise support."""
    fmt, recipe = _fmt(args), getattr(args, "fp8_recipe", "delayed")
    if fmt is None or getattr(args, "fp8_emulation", False) or recipe not in RECIPES:
        return []
    status = te_status() if status is None else status
    if status["version"] is None:
        return []                    # (named by checks._check_backend: TE is not installed)
    need = RECIPES[recipe]
    out = []
    if need is not None and not status["min_version"](need):
        out.append(f"--fp8-recipe {recipe} needs Transformer Engine >= {need} (installed: {status['version']}); "
                   "upgrade it (pip install 'megatron-dsv3[te]') or use --fp8-recipe delayed")
    if not status["gpu"]:
        out.append(f"--fp8-format {fmt} needs an NVIDIA GPU with FP8 tensor cores, and no CUDA device is visible "
                   "(use --fp8-emulation to emulate the recipe without one)")
        return out
    ok, reason = status["fp8"]
    if not ok:
        out.append(f"--fp8-format {fmt}: this GPU cannot run FP8 GEMMs ({reason}); drop --fp8-format "
                   "(BF16) or use --fp8-emulation")
    elif recipe == "blockwise":
        ok, reason = status["blockwise"]
        if not ok:
            out.append(f"--fp8-recipe blockwise: this GPU / Transformer Engine cannot run blockwise FP8 "
                       f"({reason}); use --fp8-recipe tensorwise or delayed")
    return out


def check_fp8(args: argparse.Namespace, given: set) -> None:
    """The launch check: flag combinations first, then the machine."""
    from .arguments import LaunchError

    found = fp8_flag_problems(args, given) or fp8_machine_problems(args)
    if len(found) == 1:
        raise LaunchError(found[0])
    if found:
        raise LaunchError("FP8 settings that cannot run:\n  " + "\n  ".join(found))
