"""Launch checks: errors a launch would otherwise hit late (or never), raised before any process group
exists. Each message names the flag (or file) to change."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import math
import os
import re
import struct
from typing import Optional

import numpy as np

from ..config import DSv3ConfigError, check_parallel_layout, has_moe
from ..config.mapping import fixed_flags, flag_name
from .arguments import LaunchError
from .flag_audit import check_flags
from .fp8 import check_fp8
from .safety import check_checkpoint_launch


def check_launch(args: argparse.Namespace, given: set[str], fields: dict) -> None:
    _check_fixed_and_unsupported(args, given)
    check_flags(args, given, fields)     # Megatron-LM flags acting on the modules we replaced
    _check_numbers(args, fields)
    _check_parallel(args, fields)
    _check_backend(args, given)
    check_fp8(args, given)               # FP8 recipe / Transformer Engine / emulation (training/fp8.py)
    _check_attention_features(args)      # document mask, selective recomputation (model/mla.py)
    _check_world_and_batch(args)
    _check_distributed_optimizer(args)
    _check_tokenizer(args)
    _check_hf_checkpoint(args, fields)   # --hf-checkpoint: config.json and tensors match the model
    _check_data(args)
    _check_registry(args)
    _check_dispatcher(args, fields)
    _check_schedule(args, fields)
    check_checkpoint_launch(args, given)   # --load / --save / --export-hf checkpoints (safety.py)


def _check_fixed_and_unsupported(args, given) -> None:
    for dest, (value, why) in fixed_flags().items():
        if dest not in given:
            continue
        got = getattr(args, dest)
        got = got[0] if isinstance(got, list) and len(got) == 1 else got
        if got != value:
            raise LaunchError(f"{flag_name(dest)} {got!r}: {why}, so it must be {value!r} (or left out)")
    if args.spec:
        raise LaunchError("--spec: the launcher builds the DSv3 layer specs itself; drop --spec")
    if args.export_hf is not None:
        if not args.load:
            raise LaunchError("--export-hf needs --load CHECKPOINT_DIR (the checkpoint to export)")
        if args.pipeline_model_parallel_size > 1:
            raise LaunchError("--export-hf gathers over TP/EP only: run it with "
                              "--pipeline-model-parallel-size 1 (the checkpoint reshards on load)")
    if args.calculate_per_token_loss:
        raise LaunchError("--calculate-per-token-loss is not supported by the DSv3 router's balance loss "
                          "scaling yet; drop it")
    if args.yaml_cfg is not None or args.use_checkpoint_args:
        raise LaunchError("--yaml-cfg / --use-checkpoint-args are not supported by dsv3-pretrain")


# ----------------------------------------------------------------------------------------------
# Numbers: values Megatron would take and then crash on (SIGFPE, ZeroDivisionError, bare asserts)
# ----------------------------------------------------------------------------------------------
#: flag dest -> (lowest allowed, highest allowed or None, lowest included, what the flag counts)
_RANGES = {
    "seq_length": (1, None, True, "tokens per sample"),
    "micro_batch_size": (1, None, True, "samples per micro-batch"),
    "global_batch_size": (1, None, True, "samples per step"),
    "eval_micro_batch_size": (1, None, True, "samples per evaluation micro-batch"),
    "eval_global_batch_size": (1, None, True, "samples per evaluation step"),
    "train_iters": (1, None, True, "training steps"),
    "train_samples": (1, None, True, "training samples"),
    "lr_decay_iters": (1, None, True, "steps"),
    "lr_decay_samples": (1, None, True, "samples"),
    "log_interval": (1, None, True, "steps between log lines"),
    "save_interval": (1, None, True, "steps between checkpoints"),
    "exit_interval": (1, None, True, "steps"),
    "vocab_size": (1, None, True, "tokens in the vocabulary"),
    "max_position_embeddings": (1, None, True, "positions"),
    "eval_iters": (0, None, True, "evaluation steps; 0 turns evaluation off"),
    "lr_warmup_iters": (0, None, True, "steps"),
    "lr_warmup_samples": (0, None, True, "samples"),
    "lr": (0.0, None, True, "the peak learning rate"),
    "min_lr": (0.0, None, True, "the final learning rate"),
    "lr_warmup_init": (0.0, None, True, "the learning rate at step 0"),
    "lr_warmup_fraction": (0.0, 1.0, True, "a fraction of the decay steps"),
    "clip_grad": (0.0, None, True, "the gradient-norm bound; 0 turns clipping off"),
    "weight_decay": (0.0, None, True, "the weight decay"),
    "start_weight_decay": (0.0, None, True, "the weight decay"),
    "end_weight_decay": (0.0, None, True, "the weight decay"),
    "adam_beta1": (0.0, 1.0, True, "Adam's beta1, below 1"),
    "adam_beta2": (0.0, 1.0, True, "Adam's beta2, below 1"),
    "adam_eps": (0.0, None, True, "Adam's epsilon"),
    "init_method_std": (0.0, None, True, "the init standard deviation"),
    "hidden_dropout": (0.0, 1.0, True, "a probability"),
    "attention_dropout": (0.0, 1.0, True, "a probability"),
}
_BELOW_ONE = {"adam_beta1", "adam_beta2"}   # [0, 1): torch's Adam refuses beta = 1


def _check_numbers(args, fields) -> None:
    for dest, (low, high, _, what) in _RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        bounds = f">= {low}" if high is None else f"in [{low}, {high}{')' if dest in _BELOW_ONE else ']'}"
        if isinstance(value, float) and not math.isfinite(value):
            raise LaunchError(f"{flag_name(dest)} {value}: must be a finite number {bounds} ({what})")
        if value < low or high is not None and (value > high or dest in _BELOW_ONE and value >= high):
            raise LaunchError(f"{flag_name(dest)} {value}: must be {bounds} ({what})")
    if fields.get("num_layers") is not None and fields["num_layers"] < 1:
        raise LaunchError(f"--num-layers {fields['num_layers']}: the model needs at least one layer")
    if args.seq_length is None:
        raise LaunchError("--seq-length N is required (tokens per sample)")
    max_pos = fields.get("max_position_embeddings")
    if max_pos is not None and args.seq_length > max_pos:
        raise LaunchError(f"--seq-length {args.seq_length} exceeds the model's --max-position-embeddings "
                          f"{max_pos}: lower --seq-length or raise --max-position-embeddings")
    if args.micro_batch_size is None:
        raise LaunchError("--micro-batch-size N is required (samples per micro-batch)")
    if args.lr is not None and args.min_lr > args.lr:
        raise LaunchError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr "
                          "down to --min-lr")
    if args.lr is not None and args.lr_warmup_init > args.lr:
        raise LaunchError(f"--lr-warmup-init {args.lr_warmup_init} is above --lr {args.lr}")
    if _training(args):
        _check_schedule_lengths(args)


def _training(args) -> bool:
    return args.export_hf is None and not args.skip_train


def _evaluating(args) -> bool:
    return bool(args.full_validation) or (args.eval_iters or 0) > 0


def _check_schedule_lengths(args) -> None:
    """Megatron-Core's LR scheduler asserts warmup < decay > 0; its sample counts divide by
    --eval-interval even when --eval-iters is 0."""
    if args.train_iters is None and args.train_samples is None:
        raise LaunchError("give --train-iters N (steps) or --train-samples N")
    if args.lr is None:
        raise LaunchError("--lr is required for training (the peak learning rate)")
    if args.train_iters is not None:
        decay, decay_flag = args.lr_decay_iters or args.train_iters, (
            "--lr-decay-iters" if args.lr_decay_iters else "--train-iters")
        if args.lr_warmup_fraction is None and args.lr_warmup_iters >= decay:
            raise LaunchError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below {decay_flag} {decay} "
                              "(the warmup ends before the decay does)")
    else:
        decay, decay_flag = args.lr_decay_samples or args.train_samples, (
            "--lr-decay-samples" if args.lr_decay_samples else "--train-samples")
        if args.lr_warmup_fraction is None and args.lr_warmup_samples >= decay:
            raise LaunchError(f"--lr-warmup-samples {args.lr_warmup_samples} must be below {decay_flag} "
                              f"{decay} (the warmup ends before the decay does)")
    if args.lr_warmup_fraction is not None and args.lr_warmup_fraction >= 1:
        raise LaunchError(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be below 1")
    if not args.full_validation and args.eval_interval is None:
        raise LaunchError("--eval-interval N is required for training: Megatron sizes the validation set "
                          "from it (evaluation every N steps and after the last; --eval-iters 0 turns it off, "
                          "and any --eval-interval then works)")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise LaunchError(f"--eval-interval {args.eval_interval}: must be >= 1 (steps between evaluations; "
                          "--eval-iters 0 turns evaluation off)")
    if args.save and args.save_interval is None:
        raise LaunchError("--save needs --save-interval N (steps between checkpoints)")


def _check_parallel(args, fields) -> None:
    try:
        check_parallel_layout(
            num_attention_heads=fields["num_attention_heads"],
            n_routed_experts=fields.get("n_routed_experts") if has_moe(fields) else None,
            tp=args.tensor_model_parallel_size, ep=args.expert_model_parallel_size,
            sequence_parallel=args.sequence_parallel, cp=args.context_parallel_size, style="flag")
    except DSv3ConfigError as e:
        raise LaunchError(str(e)) from None


def _check_world_and_batch(args) -> None:
    """The ranks launched (WORLD_SIZE) against the parallel sizes, and the batch sizes against the
    data-parallel size they leave (Megatron asserts both only after building the process groups, or,
    for the batch, through its evaluation batch check even with --eval-iters 0)."""
    world = args.world_size
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    model = tp * pp * cp
    sizes = (f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}"
             + (f" x --context-parallel-size {cp}" if cp != 1 else ""))
    if world % model:
        raise LaunchError(f"{world} rank(s) launched (WORLD_SIZE) is not a multiple of {sizes} = {model}: launch "
                          f"a multiple of {model} ranks or change the parallel sizes")
    etp = args.expert_tensor_parallel_size or tp
    experts = etp * args.expert_model_parallel_size * pp
    if world % experts:
        raise LaunchError(f"{world} rank(s) launched (WORLD_SIZE) is not a multiple of --expert-tensor-parallel-size "
                          f"{etp} x --expert-model-parallel-size {args.expert_model_parallel_size} x "
                          f"--pipeline-model-parallel-size {pp} = {experts}")
    dp = world // model
    if args.sequence_parallel and tp > 1 and args.seq_length % tp:
        raise LaunchError(f"--seq-length {args.seq_length} is not divisible by --tensor-model-parallel-size {tp}: "
                          "sequence parallelism splits every sequence over the TP ranks")
    mbs = args.micro_batch_size
    gbs = args.global_batch_size if args.global_batch_size is not None else mbs * dp
    if gbs % (mbs * dp):
        raise LaunchError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {mbs} x "
                          f"data-parallel size {dp} (= {world} ranks / {model}) = {mbs * dp}")
    eval_mbs = args.eval_micro_batch_size or mbs
    eval_gbs = args.eval_global_batch_size or gbs
    if eval_gbs % (eval_mbs * dp):
        which = ("--eval-global-batch-size" if args.eval_global_batch_size else "--global-batch-size (the "
                 "evaluation default)")
        raise LaunchError(f"{which} {eval_gbs} is not a multiple of --eval-micro-batch-size {eval_mbs} x "
                          f"data-parallel size {dp} = {eval_mbs * dp} (Megatron checks this even with "
                          "--eval-iters 0)")


def _check_backend(args, given) -> None:
    if args.cpu:
        from ..compat.cpu_backend import CpuSettingError, apply_cpu_settings

        try:
            apply_cpu_settings(args, given)
        except CpuSettingError as e:
            raise LaunchError(f"--cpu: {e}") from None
        if args.fp8 is not None:
            raise LaunchError("--fp8-format needs Transformer Engine on NVIDIA GPUs; it cannot run with --cpu")
        etp = args.expert_tensor_parallel_size
        if etp is not None and etp > 1 or etp is None and args.tensor_model_parallel_size > 1:
            raise LaunchError("--cpu: expert tensor parallelism (Megatron's default --expert-tensor-parallel-size "
                              "is the TP size) gathers uneven token shards, which gloo cannot; pass "
                              "--expert-tensor-parallel-size 1 (DeepSeek-V3 shards experts by EP only)")
    if args.fp8 is not None or (not args.cpu and args.transformer_impl == "transformer_engine"):
        if importlib.util.find_spec("transformer_engine") is None:
            what = "--fp8-format" if args.fp8 is not None else "--transformer-impl transformer_engine (the default)"
            raise LaunchError(f"{what} needs Transformer Engine, which is not installed: "
                              "pip install 'megatron-dsv3[te]', or use --transformer-impl local "
                              "without --fp8-format")


def _check_attention_features(args) -> None:
    """--reset-position-ids and selective recomputation against what the DSv3 modules implement."""
    import shutil

    from ..model.mla import RECOMPUTE_MODULES

    if args.reset_position_ids and not args.reset_attention_mask:
        raise LaunchError("--reset-position-ids without --reset-attention-mask: DeepSeek-V3's RoPE is "
                          "relative, so resetting positions changes no attention score unless attention "
                          "also stops at document ends; add --reset-attention-mask (each document then "
                          "attends as if run alone) or drop --reset-position-ids")
    if not (args.recompute_activations or args.recompute_granularity == "selective"):
        if args.recompute_modules is not None:
            raise LaunchError("--recompute-modules acts only with --recompute-granularity selective; add it "
                              "or drop --recompute-modules")
        return
    modules = list(args.recompute_modules if args.recompute_modules is not None else ["core_attn"])
    modules += ["moe"] if args.moe_layer_recompute else []
    for name in modules:
        if name not in RECOMPUTE_MODULES:
            raise LaunchError(f"--recompute-modules {name}: not implemented by the DeepSeek-V3 modules; "
                              f"choose from {', '.join(RECOMPUTE_MODULES)}")
    has_te = importlib.util.find_spec("transformer_engine") is not None
    if "moe_act" in modules and not (args.moe_grouped_gemm and has_te):
        raise LaunchError("--recompute-modules moe_act: Megatron-Core recomputes the expert activation only "
                          "in Transformer Engine's grouped-GEMM experts; add --moe-grouped-gemm on a Transformer "
                          "Engine install (not --cpu) or drop moe_act")
    if {"layernorm", "mla_up_proj"} & set(modules):
        from torch.utils.cpp_extension import verify_ninja_availability

        try:
            verify_ninja_availability()
            compiler = shutil.which(os.environ.get("CXX", "c++"))
        except RuntimeError:
            compiler = None
        if compiler is None:
            raise LaunchError("--recompute-modules mla_up_proj / layernorm: Megatron-Core's output-discarding "
                              "checkpoint compiles a small C++ extension on first use, which needs ninja and a "
                              "C++ compiler (pip install ninja; a system g++); install them or drop the name")


def _check_distributed_optimizer(args) -> None:
    """Megatron-Core 0.19.2's distributed optimizer on torch's Adam (no Apex / Transformer Engine)
    cannot reload a checkpoint: building the sharded state dict asserts on Adam's per-parameter
    'step' before any state exists (and its resume path loses 'step')."""
    if not (args.use_distributed_optimizer and args.load):
        return
    if any(importlib.util.find_spec(m) is not None for m in ("transformer_engine", "apex")):
        return
    raise LaunchError("--use-distributed-optimizer with --load needs Transformer Engine's (or NVIDIA "
                      "Apex's) fused Adam: Megatron-Core 0.19.2 cannot reload the distributed optimizer "
                      "on torch's Adam. Drop --use-distributed-optimizer (CPU runs) or install "
                      "megatron-dsv3[te]")


# ----------------------------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------------------------
#: tokenizer types whose --tokenizer-model is a file
_MODEL_FILE_TOKENIZERS = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                          "TikTokenizer", "SFTTokenizer")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _check_tokenizer(args) -> None:
    kind = args.tokenizer_type
    if kind is None:
        raise LaunchError("--tokenizer-type is required: HuggingFaceTokenizer with --tokenizer-model DIR, or "
                          "NullTokenizer with --vocab-size N (for --mock-data)")
    if kind in ("NullTokenizer", "NullMultimodalTokenizer") and args.vocab_size is None:
        raise LaunchError(f"--tokenizer-type {kind} needs --vocab-size N")
    for dest in ("vocab_file", "merge_file"):
        path = getattr(args, dest)
        if path is not None and not os.path.isfile(path):
            raise LaunchError(f"{flag_name(dest)} {path}: no such file")
    if kind == "GPT2BPETokenizer" and (args.vocab_file is None or args.merge_file is None):
        raise LaunchError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    model = args.tokenizer_model
    if kind in _MODEL_FILE_TOKENIZERS:
        if model is None:
            raise LaunchError(f"--tokenizer-type {kind} needs --tokenizer-model FILE")
        if not os.path.isfile(model):
            raise LaunchError(f"--tokenizer-model {model}: no such file (--tokenizer-type {kind} reads a "
                              "tokenizer model file)")
    if kind == "HuggingFaceTokenizer":
        if model is None:
            raise LaunchError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR (a local "
                              "tokenizer directory written by save_pretrained, or a hub id org/name)")
        if not os.path.exists(model) and not _hub_id(model):
            raise LaunchError(f"--tokenizer-model {model}: no such directory (give a local tokenizer "
                              "directory written by save_pretrained, or a Hugging Face hub id org/name)")


def _check_hf_checkpoint(args, fields) -> None:
    if not getattr(args, "hf_checkpoint", None):
        return
    from ..checkpoint.hf_init import check_hf_checkpoint
    from ..checkpoint.hf_keys import HFCheckpointError

    try:
        notes = check_hf_checkpoint(args.hf_checkpoint, fields, _padded_vocab(args), args.tensor_model_parallel_size,
                                    args.make_vocab_size_divisible_by)
    except HFCheckpointError as e:
        raise LaunchError(f"--hf-checkpoint {args.hf_checkpoint}: {e}") from None
    if notes and int(os.environ.get("RANK", "0")) == 0:
        print("[dsv3] --hf-checkpoint: " + "; ".join(notes), flush=True)


def _hub_id(name: str) -> bool:
    """'org/name' whose 'org' is not a local directory (then it is a path with a typo)."""
    return bool(_HUB_ID.fullmatch(name)) and not os.path.isdir(name.split("/")[0])


# ----------------------------------------------------------------------------------------------
# Data: files, index headers, blend weights, what the run will read, token ids
# ----------------------------------------------------------------------------------------------
#: the token-id check reads at most this many bytes of each .bin ...
TOKEN_SAMPLE_BYTES = 16 << 20
#: ... in this many evenly spaced windows (the first and last included) when the file is larger
TOKEN_SAMPLE_WINDOWS = 64


def _check_data(args) -> None:
    if args.mock_data:
        return
    blends = _blends(args)
    files = {}
    for split, (option, items) in blends.items():
        for weight, prefix in items:
            _check_files_exist(option, prefix)
            if prefix not in files:
                files[prefix] = read_index(prefix, option)
            if files[prefix].tokens == 0:
                raise LaunchError(f"{option} {prefix}: the dataset holds no tokens")
    _check_needed_splits(args, blends, files)
    vocab = _padded_vocab(args)
    for prefix, index in files.items():
        _check_token_ids(index, vocab, _option_of(blends, prefix), args)


def _blends(args) -> dict:
    """{'all' | 'train' | 'valid' | 'test': (option, [(weight or None, prefix), ...])}, as Megatron's
    get_blend_and_blend_per_split reads the flags ('all' is split by --split)."""
    per_split = {"train": args.train_data_path, "valid": args.valid_data_path, "test": args.test_data_path}
    whole = args.data_path or args.data_args_path
    if whole and (any(per_split.values()) or args.per_split_data_args_path):
        raise LaunchError("give --data-path (split by --split) or --train-data-path/--valid-data-path/"
                          "--test-data-path, not both: Megatron would ignore the per-split paths")
    if args.data_path:
        return {"all": ("--data-path", parse_blend(args.data_path, "--data-path"))}
    if args.data_args_path:
        option = f"--data-args-path {args.data_args_path}"
        return {"all": (option, parse_blend(_read_text(args.data_args_path, "--data-args-path").split(), option))}
    if args.per_split_data_args_path:
        import json

        text = _read_text(args.per_split_data_args_path, "--per-split-data-args-path")
        try:
            per_split = json.loads(text)
            per_split = {k: per_split.get(k) for k in ("train", "valid", "test")}
        except (ValueError, AttributeError) as e:
            raise LaunchError(f"--per-split-data-args-path {args.per_split_data_args_path}: not a JSON object "
                              f"with train/valid/test lists ({e})") from None
        per_split = {k: v.split() if isinstance(v, str) else v for k, v in per_split.items()}
    if not any(per_split.values()):
        raise LaunchError("no training data: give --data-path PREFIX (from tools/preprocess_data.py) or "
                          "--mock-data")
    if args.split is not None:
        raise LaunchError(f"--split {args.split} applies to --data-path only; drop it with the per-split paths")
    return {name: (flag_name(f"{name}_data_path"), parse_blend(paths, flag_name(f"{name}_data_path")))
            for name, paths in per_split.items() if paths}


def _read_text(path: str, option: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise LaunchError(f"{option} {path}: {e.strerror}") from None


def _option_of(blends, prefix) -> str:
    return next(option for option, items in blends.values() if any(p == prefix for _, p in items))


def parse_blend(paths: list[str], option: str = "--data-path") -> list[tuple[Optional[float], str]]:
    """[(weight, prefix)] of a Megatron data-path list ('prefix ...' or 'w1 prefix1 w2 prefix2 ...');
    weights must be finite, >= 0 and not all 0."""
    def number(s):
        try:
            return float(s)
        except ValueError:
            return None

    weights = [number(w) for w in paths[0::2]] if len(paths) > 1 and len(paths) % 2 == 0 else []
    if not any(w is not None for w in weights):
        return [(None, p) for p in paths]
    if any(w is None for w in weights):
        bad = next(w for w, n in zip(paths[0::2], weights) if n is None)
        raise LaunchError(f"{option}: {bad!r} stands where a blend weight belongs; give 'WEIGHT PREFIX' pairs "
                          "(e.g. 0.7 a_text_document 0.3 b_text_document) or prefixes only")
    for w, prefix in zip(weights, paths[1::2]):
        if not math.isfinite(w) or w < 0:
            raise LaunchError(f"{option}: blend weight {w} of {prefix} must be a finite number >= 0")
    if sum(weights) <= 0:
        raise LaunchError(f"{option}: the blend weights {weights} sum to 0; give at least one positive weight")
    return list(zip(weights, paths[1::2]))


def prefixes(paths: list[str]) -> list[str]:
    """Dataset prefixes of a Megatron data-path list ('prefix' or 'w1 prefix1 w2 prefix2 ...')."""
    return [prefix for _, prefix in parse_blend(list(paths))]


def _check_files_exist(option, prefix) -> None:
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.exists(p)]
    if missing:
        near = sorted(glob.glob(prefix + "*.idx"))[:3]
        raise LaunchError(f"{option}: {', '.join(missing)} not found"
                          + (f" (did you mean {near[0][:-4]}?)" if near else
                             "; make it with tools/preprocess_data.py"))


def _check_needed_splits(args, blends, files) -> None:
    """What the run will read: the train split when it trains; the validation split whenever
    --eval-iters > 0 (Megatron evaluates every --eval-interval steps and again after the last one, and
    crashes there on a missing split); the test split only if it has a share (Megatron skips a missing
    test split). A needed split must hold a document: Megatron's GPTDataset loops forever on an empty one."""
    need = {"train": _training(args), "valid": _evaluating(args), "test": _evaluating(args)}
    name = {"train": "train", "valid": "validation", "test": "test"}
    why = {"train": "training reads it",
           "valid": f"--eval-iters {args.eval_iters} evaluates on it every --eval-interval {args.eval_interval} "
                    "steps and after the last step"}
    if "all" not in blends:
        for split in ("train", "valid"):
            if need[split] and split not in blends:
                raise LaunchError(f"no {flag_name(split + '_data_path')}: {why[split]}"
                                  + ("; or pass --eval-iters 0" if split == "valid" else ""))
        return
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    split_arg = args.split if args.split is not None else "969, 30, 1"   # Megatron's legacy default
    shares = _split_shares(split_arg)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(",".join(map(str, shares))))
    for split, bounds in zip(("train", "valid", "test"), matrix):
        if not need[split]:
            continue
        if bounds is None:
            if split == "test":
                continue
            fix = (" or pass --eval-iters 0 (Megatron would crash in the evaluation after the last step)"
                   if split == "valid" else "")
            raise LaunchError(f"--split {split_arg} gives the {name[split]} split no share, but {why[split]}: "
                              f"give it a share (e.g. --split 99,1,0){fix}")
        for _, prefix in blends["all"][1]:
            docs = files[prefix].documents
            begin, end = (int(round(b * float(docs))) for b in bounds)
            if end <= begin:
                raise LaunchError(f"--split {split_arg}: the {name[split]} split of {prefix} gets no document "
                                  f"(it has {docs}); Megatron's dataset would loop forever. Give that split "
                                  f"a larger share{' or pass --eval-iters 0' if split != 'train' else ''}")


def _split_shares(split: str) -> list[float]:
    try:
        shares = [float(s) for s in split.split(",")]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(not math.isfinite(s) or s < 0 for s in shares) or sum(shares) <= 0:
        raise LaunchError(f"--split {split!r}: give up to three comma-separated shares >= 0 (train, validation, "
                          "test) with a positive sum, e.g. 99,1,0")
    return shares


# ----------------------------------------------------------------------------------------------
# Megatron's indexed dataset (.idx / .bin), read by hand so that a damaged file is named
# ----------------------------------------------------------------------------------------------
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")   # magic, version 1, token dtype code, sequences, document bounds


@dataclasses.dataclass
class IndexInfo:
    """What the launch checks need of one dataset: its header and sizes, checked against each other."""

    prefix: str
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int


def _read(f, dtype, offset: int, count: int) -> np.ndarray:
    f.seek(offset)
    return np.fromfile(f, dtype=dtype, count=count)


def read_index(prefix: str, option: str = "--data-path") -> IndexInfo:
    """Check ``prefix.idx`` against its own header and ``prefix.bin`` against the sizes the index lists
    (the header, the last sequence and up to 1024 sampled sequences: bounded work); raise a LaunchError
    naming the file otherwise."""
    from megatron.core.datasets.indexed_dataset import DType

    idx, bin_path = prefix + ".idx", prefix + ".bin"
    redo = "; rebuild the pair with tools/preprocess_data.py"
    size = os.path.getsize(idx)
    if size < _IDX_HEADER.size:
        raise LaunchError(f"{option}: {idx} is truncated ({size} bytes, shorter than the {_IDX_HEADER.size}-byte "
                          f"header){redo}")
    with open(idx, "rb") as f:
        magic, version, code, n_seq, n_bounds = _IDX_HEADER.unpack(f.read(_IDX_HEADER.size))
        if magic != _IDX_MAGIC:
            raise LaunchError(f"{option}: {idx} is not a Megatron index file (its first bytes are {magic!r}){redo}")
        if version != 1:
            raise LaunchError(f"{option}: {idx} has index version {version}; Megatron-Core reads version 1{redo}")
        try:
            dtype = np.dtype(DType.dtype_from_code(code))
        except ValueError:
            raise LaunchError(f"{option}: {idx} names an unknown token dtype (code {code}){redo}") from None
        want = _IDX_HEADER.size + 12 * n_seq + 8 * n_bounds    # int32 lengths, int64 pointers, int64 bounds
        if size < want:
            raise LaunchError(f"{option}: {idx} is truncated: its header lists {n_seq} sequences and {n_bounds} "
                              f"document bounds, which take {want} bytes, but the file has {size}{redo}")
        if size not in (want, want + n_seq):     # (+ one int8 mode per sequence: a multimodal index)
            raise LaunchError(f"{option}: {idx} has {size} bytes but its header ({n_seq} sequences, {n_bounds} "
                              f"document bounds) accounts for {want}; the file is damaged{redo}")
        if n_bounds < 1:
            raise LaunchError(f"{option}: {idx} lists no document bounds{redo}")
        lengths_at, pointers_at, bounds_at = (_IDX_HEADER.size, _IDX_HEADER.size + 4 * n_seq,
                                              _IDX_HEADER.size + 12 * n_seq)
        first_bound, last_bound = _read(f, np.int64, bounds_at, 1)[0], _read(f, np.int64, want - 8, 1)[0]
        if first_bound != 0 or last_bound != n_seq:
            raise LaunchError(f"{option}: {idx}: its document bounds run from {first_bound} to {last_bound}, not "
                              f"from 0 to its {n_seq} sequences; the file is damaged{redo}")
        end = 0
        if n_seq:
            sample = np.unique(np.linspace(0, n_seq - 1, min(n_seq, 1024)).astype(np.int64))
            lengths = np.array([_read(f, np.int32, lengths_at + 4 * int(i), 1)[0] for i in sample], np.int64)
            pointers = np.array([_read(f, np.int64, pointers_at + 8 * int(i), 1)[0] for i in sample])
            following = np.array([_read(f, np.int64, pointers_at + 8 * int(i) + 8, 1)[0] if i + 1 < n_seq else -1
                                  for i in sample])
            ends = pointers + lengths * dtype.itemsize
            bad = np.flatnonzero((lengths < 0) | (following >= 0) & (following != ends))
            if pointers[0] != 0 or bad.size:
                i = int(sample[bad[0]]) if bad.size else 0
                raise LaunchError(f"{option}: {idx}: sequence {i}'s length and byte offset disagree with the "
                                  f"next one's; the file is damaged{redo}")
            end = int(ends[-1])
    have = os.path.getsize(bin_path)
    tokens = f"{end // dtype.itemsize} tokens of {dtype.name}"
    if have < end:
        raise LaunchError(f"{option}: {bin_path} is truncated: {have} bytes, but {idx} lists {n_seq} sequences "
                          f"taking {end} bytes ({tokens}){redo}")
    if have > end:
        raise LaunchError(f"{option}: {bin_path} has {have} bytes, but {idx} accounts for {end} ({tokens}): the "
                          f".bin and .idx do not belong together{redo}")
    return IndexInfo(prefix, dtype, int(n_seq), int(n_bounds) - 1, end // dtype.itemsize)


def _padded_vocab(args) -> int:
    """The model's vocabulary (embedding rows) as Megatron will size it: the tokenizer's, padded."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer, vocab_size_with_padding

    probe = argparse.Namespace(**vars(args))
    probe.pad_vocab_size, probe.padded_vocab_size = False, None
    try:
        tokenizer = build_tokenizer(probe)
    except Exception as e:  # noqa: BLE001  (any failure to build it is a launch error naming the flags)
        raise LaunchError(f"--tokenizer-type {args.tokenizer_type}"
                          + (f" --tokenizer-model {args.tokenizer_model}" if args.tokenizer_model else "")
                          + f": the tokenizer does not load ({type(e).__name__}: {e})") from None
    if not getattr(args, "pad_vocab_size", True):
        return tokenizer.vocab_size
    return vocab_size_with_padding(tokenizer.vocab_size, probe, logging_enabled=False)


def _check_token_ids(index: IndexInfo, vocab: int, option: str, args) -> None:
    """Every token id must index the embedding table. Reads at most TOKEN_SAMPLE_BYTES of the .bin
    (all of it when smaller, else TOKEN_SAMPLE_WINDOWS evenly spaced windows), so an id out of range
    elsewhere is not seen at launch."""
    dtype, n = index.dtype, index.tokens
    if dtype.kind == "u" and np.iinfo(dtype).max < vocab:
        return      # (e.g. uint16 data and a vocabulary of 65536+: no id can be out of range)
    window = max(1, TOKEN_SAMPLE_BYTES // TOKEN_SAMPLE_WINDOWS // dtype.itemsize)
    if n * dtype.itemsize <= TOKEN_SAMPLE_BYTES:
        starts, window = [0], n
    else:
        starts = np.unique(np.linspace(0, n - window, TOKEN_SAMPLE_WINDOWS).astype(np.int64)).tolist()
    with open(index.prefix + ".bin", "rb") as f:
        for start in starts:
            chunk = _read(f, dtype, int(start) * dtype.itemsize, window)
            bad = np.flatnonzero((chunk >= vocab) | (chunk < 0))
            if bad.size:
                at = int(start) + int(bad[0])
                sampled = "" if starts == [0] else (f" (the launch check reads {TOKEN_SAMPLE_WINDOWS} samples of "
                                                     f"{TOKEN_SAMPLE_BYTES / 2**20:g} MiB in all)")
                raise LaunchError(
                    f"{option}: {index.prefix}.bin holds token id {chunk[bad[0]]} (token {at}, document "
                    f"{_document_of(index, at)}) but the model's vocabulary has {vocab} entries (--tokenizer-type "
                    f"{args.tokenizer_type}{_tokenizer_source(args)}, padded){sampled}: the data was tokenized "
                    "with another tokenizer; re-run tools/preprocess_data.py with this one (or give the "
                    "tokenizer the data was made with)")


def _tokenizer_source(args) -> str:
    if args.tokenizer_model:
        return f" --tokenizer-model {args.tokenizer_model}"
    return f" --vocab-size {args.vocab_size}" if args.vocab_size else ""


def _document_of(index: IndexInfo, token: int) -> int:
    """The document holding the ``token``-th token of the .bin (binary search over the index)."""
    idx = index.prefix + ".idx"
    pointers_at, bounds_at = _IDX_HEADER.size + 4 * index.sequences, _IDX_HEADER.size + 12 * index.sequences
    target = token * index.dtype.itemsize
    with open(idx, "rb") as f:
        lo, hi = 0, index.sequences - 1              # last sequence whose pointer <= target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _read(f, np.int64, pointers_at + 8 * mid, 1)[0] <= target:
                lo = mid
            else:
                hi = mid - 1
        seq = lo
        lo, hi = 0, index.documents - 1              # last document whose first sequence <= seq
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _read(f, np.int64, bounds_at + 8 * mid, 1)[0] <= seq:
                lo = mid
            else:
                hi = mid - 1
    return lo


def _check_registry(args) -> None:
    """(The schedules were parsed, and refused when malformed, by resolve_model_fields.)"""
    from .. import registry

    for table, dest, what in ((registry.DISPATCHERS, "moe_token_dispatcher_type", "--moe-token-dispatcher-type"),
                              (registry.SCHEDULES, "pipeline_schedule", "--pipeline-schedule")):
        if getattr(args, dest) not in registry.names(table):
            raise LaunchError(f"{what} {getattr(args, dest)!r} is not registered; choose one of "
                              f"{registry.names(table)}")


def _check_schedule(args, fields) -> None:
    """What a registered schedule cannot run (DualPipe: PP and micro-batch counts, layers per stage,
    virtual-pipeline flags), refused by the schedule itself (its ``check_launch``), flag named."""
    from .. import registry

    check = getattr(registry.resolve(registry.SCHEDULES, args.pipeline_schedule, "--pipeline-schedule"),
                    "check_launch", None)
    if check is not None:
        try:
            check(args, fields)
        except ValueError as e:
            raise LaunchError(str(e)) from None


def _check_dispatcher(args, fields) -> None:
    """A registered dispatcher that needs the node topology (node_limited): the cluster's nodes must
    hold every expert-parallel group evenly, and group-limited routing must route by node
    (n_group = the nodes of an EP group, each routing group the experts of one node, M <= nodes)."""
    from ..parallel.topology import (
        TopologyError,
        expert_parallel_groups,
        node_layout,
        routing_group_node_mismatch,
    )
    from ..registry import registered_dispatcher

    cls = registered_dispatcher(args.moe_token_dispatcher_type)
    if args.moe_dispatch_fp8 and not getattr(cls, "supports_fp8_dispatch", False):
        raise LaunchError(f"--moe-dispatch-fp8 needs a dispatcher with FP8 dispatch: --moe-token-dispatcher-type "
                          f"{args.moe_token_dispatcher_type!r} has none (use node_limited)")
    if not getattr(cls, "needs_topology", False) or not has_moe(fields):
        return
    name = f"--moe-token-dispatcher-type {args.moe_token_dispatcher_type}"
    rpn = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if not rpn:
        raise LaunchError(f"{name} needs the ranks per node: give --ranks-per-node (torchrun's "
                          "LOCAL_WORLD_SIZE is not set)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        groups = expert_parallel_groups(world, tp=args.tensor_model_parallel_size,
                                        pp=args.pipeline_model_parallel_size, ep=args.expert_model_parallel_size,
                                        etp=args.expert_tensor_parallel_size, cp=args.context_parallel_size)
    except TopologyError as e:
        raise LaunchError(f"{name}: {e}") from None
    n_group = fields.get("n_group") or 1        # (M = topk_group <= n_group: the config checks it)
    for ranks in groups:
        try:
            if n_group > 1:
                why = routing_group_node_mismatch(num_experts=fields["n_routed_experts"], n_group=n_group,
                                                  ep_ranks=ranks, ranks_per_node=rpn)
                nodes = node_layout(ranks, rpn).num_nodes
                if not why and fields.get("topk_group", 1) > nodes:
                    why = f"M = --moe-router-group-topk {fields['topk_group']} exceeds the {nodes} nodes"
                if why:
                    raise LaunchError(
                        f"{name} with group-limited routing needs the routing groups to be the nodes of each "
                        f"expert-parallel group ({why}; EP group {list(ranks)}, --ranks-per-node {rpn}): set "
                        f"--moe-router-num-groups to the number of nodes an EP group spans, or change "
                        f"--expert-model-parallel-size / --ranks-per-node, or route without groups "
                        f"(--moe-router-num-groups 1)")
            else:
                node_layout(ranks, rpn)
        except TopologyError as e:
            raise LaunchError(f"{name}: {e} (--ranks-per-node {rpn}, --expert-model-parallel-size "
                              f"{args.expert_model_parallel_size})") from None
