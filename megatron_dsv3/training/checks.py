"""Launch checks: errors a launch would otherwise hit late (or never), raised before any process group
exists. Each message names the flag (or file) to change."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os

from ..config import DSv3ConfigError, check_parallel_layout, has_moe
from ..config.mapping import fixed_flags, flag_name
from .arguments import LaunchError


def check_launch(args: argparse.Namespace, given: set[str], fields: dict) -> None:
    _check_fixed_and_unsupported(args, given)
    _check_parallel(args, fields)
    _check_backend(args, given)
    _check_distributed_optimizer(args)
    _check_data(args)
    _check_registry(args)


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


def _check_parallel(args, fields) -> None:
    try:
        check_parallel_layout(
            num_attention_heads=fields["num_attention_heads"],
            n_routed_experts=fields.get("n_routed_experts") if has_moe(fields) else None,
            tp=args.tensor_model_parallel_size, ep=args.expert_model_parallel_size,
            sequence_parallel=args.sequence_parallel, cp=args.context_parallel_size, style="flag")
    except DSv3ConfigError as e:
        raise LaunchError(str(e)) from None


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


def _check_data(args) -> None:
    if args.mock_data:
        return
    if not (args.data_path or args.train_data_path or args.per_split_data_args_path or args.data_args_path):
        raise LaunchError("no training data: give --data-path PREFIX (from tools/preprocess_data.py) or "
                          "--mock-data")
    for option, paths in (("--data-path", args.data_path), ("--train-data-path", args.train_data_path),
                          ("--valid-data-path", args.valid_data_path), ("--test-data-path", args.test_data_path)):
        for prefix in prefixes(paths or []):
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.exists(p)]
            if missing:
                near = sorted(glob.glob(prefix + "*.idx"))[:3]
                raise LaunchError(f"{option}: {', '.join(missing)} not found"
                                  + (f" (did you mean {near[0][:-4]}?)" if near else
                                     "; make it with tools/preprocess_data.py"))
    if args.data_path and args.split:
        _check_split_sizes(args)


def _check_registry(args) -> None:
    """(The schedules were parsed, and refused when malformed, by resolve_model_fields.)"""
    from .. import registry

    for table, dest, what in ((registry.DISPATCHERS, "moe_token_dispatcher_type", "--moe-token-dispatcher-type"),
                              (registry.SCHEDULES, "pipeline_schedule", "--pipeline-schedule")):
        if getattr(args, dest) not in registry.names(table):
            raise LaunchError(f"{what} {getattr(args, dest)!r} is not registered; choose one of "
                              f"{registry.names(table)}")


def _check_split_sizes(args) -> None:
    """Megatron's GPTDataset never returns when a split it must sample from holds no document
    (an endless epoch loop), e.g. 10 documents with --split 98,2,0: refuse that launch."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(args.split))
    needed = {"train": (args.train_iters or 0) > 0 or (args.train_samples or 0) > 0,
              "validation": args.eval_iters > 0, "test": args.eval_iters > 0}
    for prefix in prefixes(args.data_path):
        dataset = IndexedDataset(prefix)
        docs = dataset.document_indices.shape[0] - 1
        tokens = int(dataset.sequence_lengths.sum())
        del dataset
        for (name, need), bounds in zip(needed.items(), matrix):
            if not need or bounds is None:
                continue
            begin, end = (int(round(b * float(docs))) for b in bounds)
            if end <= begin:
                raise LaunchError(f"--split {args.split}: the {name} split of {prefix} gets no document "
                                  f"(it has {docs}); Megatron's dataset would loop forever. Give that split "
                                  f"a larger share{' or pass --eval-iters 0' if name != 'train' else ''}")
        if tokens == 0:
            raise LaunchError(f"--data-path {prefix}: the dataset holds no tokens")


def prefixes(paths: list[str]) -> list[str]:
    """Dataset prefixes of a Megatron data-path list ('prefix' or 'w1 prefix1 w2 prefix2 ...')."""
    if len(paths) > 1 and len(paths) % 2 == 0:
        try:
            float(paths[0])
            return paths[1::2]
        except ValueError:
            pass
    return list(paths)
