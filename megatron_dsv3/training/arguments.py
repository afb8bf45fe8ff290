"""The launcher's arguments: Megatron-LM's own parser plus megatron-dsv3's flags, and the DSv3 model
they describe.

The model is a preset (``--dsv3-preset``) or a HF ``config.json`` (``--dsv3-hf-config``); Megatron's
model flags given explicitly override it. Which flag sets which DSv3 field, and which Megatron-LM
arguments the resolved model writes back (so Megatron's FLOP count, logging, pipeline layout and
checkpoint checks see the same model) is the one table in :mod:`megatron_dsv3.config.mapping`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

from ..config import PRESETS, RECIPES, DSv3Config, DSv3ConfigError, missing_coefficients
from ..config.hf_config import hf_to_config_kwargs, read_hf_config
from ..config.mapping import (
    DERIVED_MEGATRON_FIELDS,
    ROWS,
    YARN_KEYS,
    flag_name,
    megatron_arg_values,
    moe_layer_pattern,
)
from ..config.schedules import Schedule, ScheduleError


class LaunchError(SystemExit):
    """A launch that cannot work; raised before any process group is built."""

    def __init__(self, message: str):
        super().__init__(f"dsv3-pretrain: error: {message}")


def add_dsv3_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..compat.cpu_backend import cpu_arg_settings

    g = parser.add_argument_group("megatron-dsv3")
    g.add_argument("--dsv3-preset", default=None,
                   help=f"DSv3 model preset: one of {sorted(PRESETS)}. Megatron model flags given "
                        "explicitly override it.")
    g.add_argument("--dsv3-hf-config", default=None,
                   help="HF DeepSeek-V3 config.json (file or directory) as the model instead of a preset")
    g.add_argument("--n-shared-experts", type=int, default=None, help="shared experts (671B: 1)")
    g.add_argument("--first-k-dense-replace", type=int, default=None,
                   help="the first k layers are dense (671B: 3)")
    g.add_argument("--norm-topk-prob", action=argparse.BooleanOptionalAction, default=None,
                   help="renormalise the chosen routing weights (671B: true)")
    g.add_argument("--moe-router-bias-update-schedule", default=None,
                   help="gamma over consumed tokens, e.g. 0:0.001,14.3T:0 (instead of "
                        "--moe-router-bias-update-rate)")
    g.add_argument("--mtp-loss-scaling-schedule", default=None,
                   help="MTP lambda over consumed tokens, e.g. 0:0.3,10T:0.1 (instead of "
                        "--mtp-loss-scaling-factor)")
    g.add_argument("--pipeline-schedule", default="1f1b",
                   help="forward-backward schedule from megatron_dsv3.registry.SCHEDULES")
    g.add_argument("--ranks-per-node", type=int, default=None,
                   help="GPUs per node, for the node_limited dispatcher and the cross-node routing metric "
                        "(default: LOCAL_WORLD_SIZE from torchrun; without it the metric is not logged)")
    g.add_argument("--moe-dispatch-fp8", action="store_true",
                   help="node_limited dispatcher: send dispatched activations as FP8 e4m3 with one scale "
                        "per 1x128 tile (report sec. 3.3); combine stays in the training dtype")
    g.add_argument("--fp8-emulation", action="store_true",
                   help="emulate DeepSeek-V3's FP8 recipe on the local layers (CPU or any device): e4m3 GEMM "
                        "inputs, activations per 1x128 tile, weights per 128x128 block, in Fprop, Dgrad and "
                        "Wgrad, fp32 accumulation; embedding, head, router, norms, attention core and MTP "
                        "eh_proj stay in the training precision (megatron_dsv3/model/fp8_emulation.py)")
    g.add_argument("--activation-func-fp8-input-store", action="store_true",
                   help="with --fp8-format: Transformer Engine caches the SwiGLU input of the experts, shared "
                        "experts and dense FFN in FP8 for backward (report sec. 3.3.3; Megatron-Core's config "
                        "field of that name)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s of one device, for MFU on devices not in "
                        "megatron_dsv3.training.flops.PEAK_TFLOPS")
    g.add_argument("--export-hf", default=None, metavar="DIR",
                   help="load the --load checkpoint, write it as a HF DeepSeek-V3 checkpoint to DIR "
                        "(config.json + model.safetensors) and exit without training (no pipeline "
                        "parallelism)")
    g.add_argument("--hf-checkpoint", default=None, metavar="DIR",
                   help="initialise the model from a HF DeepSeek-V3 checkpoint (safetensors, FP8 or not; "
                        "each rank reads only its own shards); refused at launch when its config.json or "
                        "tensors do not match the launched model. A checkpoint in --load wins (resume)")
    g.add_argument("--export-hf-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the exported weights (the expert bias stays fp32)")
    g.add_argument("--metrics-jsonl", default=None,
                   help="also append every iteration's DSv3 scalars (full precision) to this JSON-lines "
                        "file (written by the last rank)")
    g.add_argument("--allow-fresh-start", action="store_true",
                   help="train from scratch when --load (a directory other than --save) holds no "
                        "checkpoint; without it that launch is an error naming the path")
    g.add_argument("--verify-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="write a manifest of SHA-256 hashes into each saved checkpoint (once its shards "
                        "are complete, before it becomes latest) and check it before loading, naming "
                        "any missing, truncated or changed file (default: on)")
    g.add_argument("--cpu", action="store_true",
                   help="train on CPU with gloo through megatron_dsv3.cpu_backend (sets "
                        + ", ".join(f"{k}={v}" for k, v in cpu_arg_settings().items()) + ")")
    return parser


# ----------------------------------------------------------------------------------------------
# Parsing: Megatron's parser + ours, remembering which flags were given
# ----------------------------------------------------------------------------------------------
class _Unset:
    def __repr__(self):
        return "<unset>"


_UNSET = _Unset()


def extra_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's ``extra_args_provider``: our flags, and our registered dispatcher names."""
    from .. import registry

    for action in parser._actions:   # dispatchers registered by megatron-dsv3 are valid names too
        if action.dest == "moe_token_dispatcher_type":
            action.choices = sorted(set(action.choices) | set(registry.names(registry.DISPATCHERS)))
    return add_dsv3_args(parser)


def megatron_arguments():
    """``megatron.training.arguments`` (importable on Python 3.11 after the typing_override patch)."""
    from ..compat.patches import apply, typing_override

    apply([typing_override.PATCH])
    from megatron.training import arguments

    return arguments


class _LaunchParser(argparse.ArgumentParser):
    """A usage error prints the message, the closest flag names and a hint (exit code 2), not argparse's
    usage line, which lists all ~750 Megatron flags and buries the message."""

    def error(self, message: str):
        import difflib

        known = [o for a in self._actions for o in a.option_strings]
        hints = []
        if message.startswith("unrecognized arguments:"):
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=2) if word.startswith("-") else []
                if close:
                    hints.append(f"{word}: did you mean {' or '.join(close)}?")
        hints.append("run with --help for all flags")
        self.exit(2, f"dsv3-pretrain: error: {message}\n" + "\n".join(hints) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _LaunchParser(description="megatron-dsv3 pretraining (Megatron-LM flags + DSv3)",
                           allow_abbrev=False)
    megatron_arguments().add_megatron_arguments(parser)
    return extra_args(parser)


def parse(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """(args as Megatron's parse_args makes them, dests given on the command line)."""
    parser = build_parser()
    probe = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=probe)
    given = {k for k, v in vars(probe).items() if v is not _UNSET}
    saved = sys.argv
    sys.argv = [saved[0] if saved else "dsv3-pretrain", *argv]
    try:
        args = megatron_arguments().parse_args(extra_args)
    finally:
        sys.argv = saved
    return args, given


# ----------------------------------------------------------------------------------------------
# The preset's training recipe
# ----------------------------------------------------------------------------------------------
#: A recipe row is not applied when the user gave one of these (the same quantity another way).
_RECIPE_ALTERNATIVES = {
    "moe_router_bias_update_schedule": ("moe_router_bias_update_rate",),
    "mtp_loss_scaling_schedule": ("mtp_loss_scaling_factor",),
    "lr_warmup_samples": ("lr_warmup_iters", "lr_warmup_fraction"),
    "lr_decay_samples": ("lr_decay_iters",),
    "lr_wsd_decay_samples": ("lr_wsd_decay_iters",),
}


def apply_recipe(args: argparse.Namespace, given: set[str]) -> list[str]:
    """Set the preset's training recipe (config.presets.RECIPES) where the user gave no flag; returns
    '--flag value' for each one set, and '(not applied: ...)' notes."""
    rows = RECIPES.get(args.dsv3_preset or "", [])
    done, skipped = [], []
    for dest, value, _, samples_only in rows:
        if dest in given or any(a in given for a in _RECIPE_ALTERNATIVES.get(dest, ())):
            continue
        if samples_only and args.train_iters is not None:
            skipped.append(flag_name(dest))
            continue
        setattr(args, dest, value)
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        done.append(f"{flag_name(dest)} {shown}")
    if skipped:
        done.append("(not applied with --train-iters, the schedule is token-keyed; use --train-samples: "
                    + ", ".join(skipped) + ")")
    return done


# ----------------------------------------------------------------------------------------------
# Flags -> DSv3 fields
# ----------------------------------------------------------------------------------------------
def _base_fields(args) -> dict:
    if (args.dsv3_preset is None) == (args.dsv3_hf_config is None):
        raise LaunchError("give exactly one of --dsv3-preset (one of "
                          f"{sorted(PRESETS)}) or --dsv3-hf-config PATH")
    if args.dsv3_preset is not None:
        if args.dsv3_preset not in PRESETS:
            raise LaunchError(f"--dsv3-preset {args.dsv3_preset!r} is unknown; choose one of {sorted(PRESETS)}")
        return dict(PRESETS[args.dsv3_preset])
    defaults: dict = {}
    try:
        fields = hf_to_config_kwargs(read_hf_config(args.dsv3_hf_config), defaults)
    except (OSError, DSv3ConfigError, KeyError) as e:
        raise LaunchError(f"--dsv3-hf-config {args.dsv3_hf_config}: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        if defaults:
            print(f"[dsv3] {args.dsv3_hf_config}: keys not in config.json take transformers' defaults: "
                  + ", ".join(f"{k}={v!r}" for k, v in sorted(defaults.items())), flush=True)
        if fields.get("seq_aux_alpha") is not None:
            print(f"[dsv3] {args.dsv3_hf_config}: sequence-wise balance alpha {fields['seq_aux_alpha']} from "
                  "config.json's aux_loss_alpha (--moe-aux-loss-coeff overrides it)", flush=True)
    for coefficient in ("mtp_lambda", "bias_update_rate", "seq_aux_alpha"):
        fields.setdefault(coefficient, None)
    return fields


def _rope_from_flags(args, given, rope: Optional[dict]) -> Optional[dict]:
    """rope_scaling after --rope-type and the six YaRN flags (a context-extension run adds YaRN to a
    model trained with plain RoPE by giving --rope-type yarn and all six values)."""
    if "rope_type" in given:
        if args.rope_type == "rope":
            rope = None
        elif args.rope_type == "yarn" and rope is None:
            missing = [flag_name(f) for f in YARN_KEYS.values() if f not in given]
            if missing:
                raise LaunchError("--rope-type yarn on a model with plain RoPE needs every YaRN value; also "
                                  "give " + ", ".join(missing))
            rope = {"type": "yarn"}
        elif args.rope_type not in ("rope", "yarn"):
            raise LaunchError(f"--rope-type {args.rope_type!r}: DeepSeek-V3 uses 'rope' or 'yarn'")
    yarn_given = [flag for flag in YARN_KEYS.values() if flag in given]
    if yarn_given:
        if rope is None:
            raise LaunchError("YaRN flags (" + ", ".join(flag_name(f) for f in yarn_given)
                              + ") given but the model uses plain RoPE; add --rope-type yarn with all "
                              "six YaRN values or drop them")
        rope = dict(rope)
        for key, flag in YARN_KEYS.items():
            if flag in given:
                rope[key] = getattr(args, flag)
    return rope


def _moe_layer_freq_from_flags(args, given, fields) -> None:
    """--moe-layer-freq: an int N (every N-th layer after the dense ones is MoE, HF's moe_layer_freq)
    or Megatron's 0/1 list, which must be such a pattern."""
    freq = args.moe_layer_freq
    if isinstance(freq, int):
        fields["moe_layer_interval"] = freq
        return
    L = fields["num_layers"]
    if not isinstance(freq, list) or len(freq) != L:
        raise LaunchError(f"--moe-layer-freq: give an int or a list of {L} 0/1 entries (one per layer)")
    for k in range(L + 1):
        for every in range(1, L + 1):
            if moe_layer_pattern({"first_k_dense_replace": k, "num_layers": L, "moe_layer_interval": every}) == freq:
                if "first_k_dense_replace" in given and args.first_k_dense_replace != k:
                    raise LaunchError(f"--moe-layer-freq says {k} dense layers first but --first-k-dense-replace "
                                      f"says {args.first_k_dense_replace}; give only one of them")
                fields["first_k_dense_replace"], fields["moe_layer_interval"] = k, every
                return
    raise LaunchError("--moe-layer-freq: DSv3 layers are dense for the first k, then MoE every N-th layer "
                      "(HF moe_layer_freq); this list is not such a pattern. Give --first-k-dense-replace k "
                      "and --moe-layer-freq N instead")


def _single(value, dest):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise LaunchError(f"{flag_name(dest)} takes one value for DSv3 (the sequence-wise alpha), got {value}")
        return value[0]
    return value


def resolve_model_fields(args: argparse.Namespace, given: set[str]) -> dict:
    """The DSv3Config fields of this launch (without vocab_size, which comes from the tokenizer).

    Also parses the coefficient schedules once (``args.dsv3_schedules``: {field: Schedule})."""
    fields = _base_fields(args)
    for row in ROWS:
        if row.field is None or row.flag is None or row.flag not in given or row.field.startswith("rope_scaling."):
            continue
        value = getattr(args, row.flag)
        fields[row.field] = _single(value, row.flag) if row.flag == "moe_aux_loss_coeff" else value
    if "moe_shared_expert_intermediate_size" in given:
        size, inter = args.moe_shared_expert_intermediate_size, fields.get("moe_intermediate_size")
        if not inter or size % inter:
            raise LaunchError(f"--moe-shared-expert-intermediate-size {size} must be a multiple of the "
                              f"expert width {inter}; or give --n-shared-experts")
        fields["n_shared_experts"] = size // inter
    if "moe_layer_freq" in given:
        _moe_layer_freq_from_flags(args, given, fields)
    fields["rope_scaling"] = _rope_from_flags(args, given, fields.get("rope_scaling"))
    from ..registry import registered_dispatcher

    if registered_dispatcher(args.moe_token_dispatcher_type) is not None:
        fields["token_dispatcher"] = args.moe_token_dispatcher_type
    if fields.get("mtp_num_layers") == 0:
        fields["mtp_num_layers"] = None
    args.dsv3_schedules = {}
    for schedule, rate, field in (("moe_router_bias_update_schedule", "moe_router_bias_update_rate",
                                   "bias_update_rate"),
                                  ("mtp_loss_scaling_schedule", "mtp_loss_scaling_factor", "mtp_lambda")):
        if getattr(args, schedule):
            if rate in given:
                raise LaunchError(f"give {flag_name(rate)} or {flag_name(schedule)}, not both")
            try:
                parsed = Schedule.parse(getattr(args, schedule), flag_name(schedule))
            except ScheduleError as e:
                raise LaunchError(str(e)) from None
            args.dsv3_schedules[field] = parsed
            fields[field] = parsed.at(0)
    _require_coefficients(fields)
    return fields


#: How the launcher asks for each training coefficient a config may lack.
COEFFICIENT_FLAGS = {
    "seq_aux_alpha": "--moe-aux-loss-coeff ALPHA (sequence-wise balance; paper 0.0001, 0 disables)",
    "bias_update_rate": "--moe-router-bias-update-rate GAMMA (paper 0.001) or --moe-router-bias-update-schedule",
    "mtp_lambda": "--mtp-loss-scaling-factor LAMBDA (paper 0.3) or --mtp-loss-scaling-schedule",
}


def _require_coefficients(fields: dict) -> None:
    """A HF config carries no gamma / lambda (and maybe no alpha): each one the model uses is a flag."""
    missing = missing_coefficients(fields)
    if missing:
        raise LaunchError("the model's config has no value for these training coefficients; give "
                          + "; ".join(COEFFICIENT_FLAGS[name] for name, _ in missing))


# ----------------------------------------------------------------------------------------------
# DSv3 fields -> Megatron args; Megatron args -> DSv3Config
# ----------------------------------------------------------------------------------------------
def apply_to_megatron_args(args: argparse.Namespace, fields: dict) -> argparse.Namespace:
    """Write the resolved model into Megatron's args (the same model for every Megatron reader)."""
    for dest, value in megatron_arg_values(fields).items():
        setattr(args, dest, value)
    return args


def model_config_from_args(args: argparse.Namespace, fields: Optional[dict] = None) -> DSv3Config:
    """The DSv3Config of this run: the DSv3 fields plus Megatron's translation of every other flag
    (parallel sizes, dtypes, fusions, recomputation, init ...)."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    fields = dict(fields if fields is not None else args.dsv3_fields)
    megatron = core_transformer_config_from_args(args)
    own = {f.name for f in dataclasses.fields(DSv3Config)} - {f.name for f in dataclasses.fields(type(megatron))}
    kwargs = {f.name: getattr(megatron, f.name) for f in dataclasses.fields(type(megatron))
              if f.init and f.name not in DERIVED_MEGATRON_FIELDS and f.name not in own}
    kwargs.update(fields)
    kwargs["vocab_size"] = args.padded_vocab_size
    kwargs["ranks_per_node"] = args.ranks_per_node
    kwargs["activation_func_fp8_input_store"] = bool(getattr(args, "activation_func_fp8_input_store", False))
    return DSv3Config(**kwargs)
