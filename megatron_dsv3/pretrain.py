"""dsv3-pretrain: DeepSeek-V3 pretraining on Megatron-Core's own training loop (``megatron.training``).

    # 8 GPUs, one node (any Megatron-LM pretrain_gpt.py flags, plus a DSv3 model)
    torchrun --nproc-per-node 8 -m megatron_dsv3.pretrain --dsv3-preset deepseek-v3 --num-layers 8 \\
        --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 4 \\
        --seq-length 4096 --micro-batch-size 1 --global-batch-size 64 --train-iters 1000 --lr 2.2e-4 \\
        --bf16 --tokenizer-type HuggingFaceTokenizer --tokenizer-model /data/tok \\
        --data-path /data/corpus_text_document --split 99,1,0 --save ckpt --load ckpt
    # CPU, 4 gloo ranks (see examples/quickstart_cpu.sh)
    torchrun --nproc-per-node 4 -m megatron_dsv3.pretrain --cpu --dsv3-preset tiny ...

Megatron-LM's flag names are taken unchanged, so an existing ``pretrain_gpt.py`` launch script works
by swapping the entry point (``dsv3-pretrain`` is the console script). The model is a DSv3 preset
(``--dsv3-preset``) or a HF ``config.json`` (``--dsv3-hf-config``); Megatron's model flags given
explicitly override it (``--num-layers``, ``--num-experts``, ``--q-lora-rank``, ``--moe-router-topk``
...: :data:`FIELD_FLAGS`). What the launcher adds:

1. checks the launch before any process group exists (flag named in every error);
2. resolves the DSv3 model, writes it back into Megatron's args (so Megatron's FLOP count, logging,
   pipeline layout and checkpoint checks see the same model) and builds it from our specs;
3. resolves ``--moe-token-dispatcher-type`` and ``--pipeline-schedule`` through
   :mod:`megatron_dsv3.registry`;
4. applies the token-keyed gamma / lambda schedules each step, and logs DSv3 metrics
   (:mod:`megatron_dsv3.metrics`) to the console and W&B.

The expert-bias update itself is Megatron-Core's ``finalize_model_grads`` step hook: after each
global batch the per-expert token counts of our router are summed over the TP x DP x CP ranks that
route for the layer and every bias moves by gamma * sign(mean - count).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import sys
from functools import partial
from typing import Optional

from . import cpu_backend
from .coefficients import Schedule, ScheduleError
from .config import (
    DERIVED_MEGATRON_FIELDS,
    PRESETS,
    DSv3Config,
    DSv3ConfigError,
    _read_hf_config,
    hf_to_config_kwargs,
)


class LaunchError(SystemExit):
    """A launch that cannot work; raised before any process group is built."""

    def __init__(self, message: str):
        super().__init__(f"dsv3-pretrain: error: {message}")


# ----------------------------------------------------------------------------------------------
# DSv3 model fields <-> Megatron-LM flags
# ----------------------------------------------------------------------------------------------
#: DSv3Config field -> Megatron-LM argument (dest). Given explicitly, the flag overrides the preset;
#: after resolution the launcher writes the DSv3 value back into the argument.
FIELD_FLAGS: dict[str, str] = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "max_position_embeddings": "max_position_embeddings",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_head_dim",
    "qk_rope_head_dim": "qk_pos_emb_head_dim",
    "v_head_dim": "v_head_dim",
    "rope_theta": "rotary_base",
    "rms_norm_eps": "layernorm_epsilon",
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "n_routed_experts": "num_experts",
    "num_experts_per_tok": "moe_router_topk",
    "n_group": "moe_router_num_groups",
    "topk_group": "moe_router_group_topk",
    "routed_scaling_factor": "moe_router_topk_scaling_factor",
    "scoring_func": "moe_router_score_function",
    "bias_update_rate": "moe_router_bias_update_rate",
    "seq_aux_alpha": "moe_aux_loss_coeff",
    "mtp_num_layers": "mtp_num_layers",
    "mtp_lambda": "mtp_loss_scaling_factor",
    # DSv3 flags this launcher adds (same name as the field)
    "n_shared_experts": "n_shared_experts",
    "first_k_dense_replace": "first_k_dense_replace",
    "norm_topk_prob": "norm_topk_prob",
}

#: YaRN keys of DSv3Config.rope_scaling -> Megatron-LM argument.
YARN_FLAGS: dict[str, str] = {
    "factor": "rotary_scaling_factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "original_max_position_embeddings": "yarn_original_max_position_embeddings",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
}

#: Megatron-LM arguments the DSv3 architecture fixes: (value, why). Given explicitly with another
#: value they are an error, never silently overwritten.
FIXED_ARGS: dict[str, tuple[object, str]] = {
    "multi_latent_attention": (True, "DSv3 attention is MLA"),
    "normalization": ("RMSNorm", "DSv3 uses RMSNorm"),
    "swiglu": (True, "DSv3 FFNs are SwiGLU"),
    "add_bias_linear": (False, "DSv3 linears have no bias"),
    "qk_layernorm": (True, "DSv3 normalises the q and kv latents"),
    "untie_embeddings_and_output_weights": (True, "DSv3 has separate embedding and head"),
    "position_embedding_type": ("none", "MLA applies its decoupled RoPE itself"),
    "moe_router_load_balancing_type": ("seq_aux_loss", "DSv3 balances with expert bias + the "
                                       "sequence-wise loss"),
    "moe_router_pre_softmax": (False, "DSv3 normalises after top-k"),
    "moe_router_dtype": ("fp32", "DSv3 routes in fp32"),
    "moe_grouped_gemm": (None, ""),   # free choice, listed so it is never touched
}

CPU_FLAGS: dict[str, object] = {
    "distributed_backend": "gloo",
    "use_cpu_initialization": True,
    "gradient_accumulation_fusion": False,
    "transformer_impl": "local",
    "no_persist_layer_norm": True,
    "apply_rope_fusion": False,
    "bias_dropout_fusion": False,
    "bias_swiglu_fusion": False,
    "masked_softmax_fusion": False,
    "cross_entropy_loss_fusion": False,
    "moe_permute_fusion": False,
    "moe_router_fusion": False,
    "moe_grouped_gemm": False,
    "bf16": False,
    "fp16": False,
}


def add_dsv3_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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
                   help="GPUs per node, for the cross-node routing metric (default: LOCAL_WORLD_SIZE "
                        "from torchrun; without it the metric is not logged)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s of one device, for MFU on devices not in "
                        "megatron_dsv3.flops.PEAK_TFLOPS")
    g.add_argument("--export-hf", default=None, metavar="DIR",
                   help="load the --load checkpoint, write it as a HF DeepSeek-V3 checkpoint to DIR "
                        "(config.json + model.safetensors) and exit without training (no pipeline "
                        "parallelism)")
    g.add_argument("--export-hf-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the exported weights (the expert bias stays fp32)")
    g.add_argument("--metrics-jsonl", default=None,
                   help="also append every iteration's DSv3 scalars (full precision) to this JSON-lines "
                        "file (written by the last rank)")
    g.add_argument("--cpu", action="store_true",
                   help="train on CPU with gloo through megatron_dsv3.cpu_backend (sets "
                        + ", ".join(f"{k}={v}" for k, v in CPU_FLAGS.items()) + ")")
    return parser


# ----------------------------------------------------------------------------------------------
# Argument parsing: Megatron's parser + ours, remembering which flags were given
# ----------------------------------------------------------------------------------------------
class _Unset:
    def __repr__(self):
        return "<unset>"


_UNSET = _Unset()


def _extra_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .registry import DISPATCHERS

    for action in parser._actions:   # dispatchers registered by megatron-dsv3 are valid names too
        if action.dest == "moe_token_dispatcher_type":
            action.choices = sorted(set(action.choices) | set(DISPATCHERS))
    return add_dsv3_args(parser)


def _megatron_arguments():
    from .patches import apply, typing_override

    apply([typing_override.PATCH])
    from megatron.training import arguments

    return arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="megatron-dsv3 pretraining (Megatron-LM flags + DSv3)",
                                     allow_abbrev=False)
    _megatron_arguments().add_megatron_arguments(parser)
    return _extra_args(parser)


def parse(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """(args as Megatron's parse_args makes them, dests given on the command line)."""
    parser = build_parser()
    probe = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=probe)
    given = {k for k, v in vars(probe).items() if v is not _UNSET}
    saved = sys.argv
    sys.argv = [saved[0] if saved else "dsv3-pretrain", *argv]
    try:
        args = _megatron_arguments().parse_args(_extra_args)
    finally:
        sys.argv = saved
    return args, given


# ----------------------------------------------------------------------------------------------
# Launch checks (no process group yet)
# ----------------------------------------------------------------------------------------------
def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def resolve_model_fields(args: argparse.Namespace, given: set[str]) -> dict:
    """The DSv3Config fields (without vocab_size, which comes from the tokenizer)."""
    if (args.dsv3_preset is None) == (args.dsv3_hf_config is None):
        raise LaunchError("give exactly one of --dsv3-preset (one of "
                          f"{sorted(PRESETS)}) or --dsv3-hf-config PATH")
    if args.dsv3_preset is not None:
        if args.dsv3_preset not in PRESETS:
            raise LaunchError(f"--dsv3-preset {args.dsv3_preset!r} is unknown; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[args.dsv3_preset])
    else:
        try:
            fields = hf_to_config_kwargs(_read_hf_config(args.dsv3_hf_config))
        except (OSError, DSv3ConfigError, KeyError) as e:
            raise LaunchError(f"--dsv3-hf-config {args.dsv3_hf_config}: {e}") from None
        fields.setdefault("mtp_lambda", None)
        fields.setdefault("bias_update_rate", None)
        fields.setdefault("seq_aux_alpha", None)
    for field, dest in FIELD_FLAGS.items():
        if dest in given:
            value = getattr(args, dest)
            if dest == "moe_aux_loss_coeff":
                value = _single(value, dest)
            fields[field] = value
    if "moe_shared_expert_intermediate_size" in given:
        size, inter = args.moe_shared_expert_intermediate_size, fields.get("moe_intermediate_size")
        if not inter or size % inter:
            raise LaunchError(f"--moe-shared-expert-intermediate-size {size} must be a multiple of the "
                              f"expert width {inter}; or give --n-shared-experts")
        fields["n_shared_experts"] = size // inter
    if "moe_layer_freq" in given:
        freq = args.moe_layer_freq
        L = fields["num_layers"]
        k = freq.index(1) if isinstance(freq, list) and 1 in freq else None
        if not isinstance(freq, list) or len(freq) != L or freq != [0] * k + [1] * (L - k):
            raise LaunchError("--moe-layer-freq: DSv3 has dense layers first, then MoE "
                              "([0]*k+[1]*(L-k)); give --first-k-dense-replace k instead")
        if "first_k_dense_replace" in given and args.first_k_dense_replace != k:
            raise LaunchError(f"--moe-layer-freq says {k} dense layers but --first-k-dense-replace says "
                              f"{args.first_k_dense_replace}; give only one of them")
        fields["first_k_dense_replace"] = k
    rope = fields.get("rope_scaling")
    if "rope_type" in given and args.rope_type == "rope":
        fields["rope_scaling"] = rope = None
    if any(YARN_FLAGS[k] in given for k in YARN_FLAGS):
        if rope is None:
            raise LaunchError("YaRN flags (" + ", ".join(_flag(YARN_FLAGS[k]) for k in YARN_FLAGS
                                                        if YARN_FLAGS[k] in given)
                              + ") given but the model uses plain RoPE; add --rope-type yarn with all "
                              "six YaRN values or drop them")
        rope = dict(rope)
        for key, dest in YARN_FLAGS.items():
            if dest in given:
                rope[key] = getattr(args, dest)
        fields["rope_scaling"] = rope
    if fields.get("mtp_num_layers") == 0:
        fields["mtp_num_layers"] = None
    for schedule, rate, field in (("moe_router_bias_update_schedule", "moe_router_bias_update_rate",
                                   "bias_update_rate"),
                                  ("mtp_loss_scaling_schedule", "mtp_loss_scaling_factor", "mtp_lambda")):
        if getattr(args, schedule):
            if rate in given:
                raise LaunchError(f"give {_flag(rate)} or {_flag(schedule)}, not both")
            try:
                fields[field] = Schedule.parse(getattr(args, schedule), _flag(schedule)).at(0)
            except ScheduleError as e:
                raise LaunchError(str(e)) from None
    _require_coefficients(fields)
    return fields


def _require_coefficients(fields: dict) -> None:
    """A HF config carries no training coefficients: each one the model uses must be a flag."""
    moe = _has_moe(fields)
    needed = []
    if moe and fields.get("seq_aux_alpha") is None:
        needed.append("--moe-aux-loss-coeff ALPHA (sequence-wise balance; paper 0.0001, 0 disables)")
    if moe and fields.get("scoring_func") == "sigmoid" and fields.get("bias_update_rate") is None:
        needed.append("--moe-router-bias-update-rate GAMMA (paper 0.001) or "
                      "--moe-router-bias-update-schedule")
    if fields.get("mtp_num_layers") and fields.get("mtp_lambda") is None:
        needed.append("--mtp-loss-scaling-factor LAMBDA (paper 0.3) or --mtp-loss-scaling-schedule")
    if needed:
        raise LaunchError("the model's config has no training coefficients; give " + "; ".join(needed))


def _single(value, dest):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise LaunchError(f"{_flag(dest)} takes one value for DSv3 (the sequence-wise alpha), got {value}")
        return value[0]
    return value


def check_launch(args: argparse.Namespace, given: set[str], fields: dict) -> None:
    """Errors a launch would otherwise hit late (or never): each names the flag to change."""
    _check_fixed_and_unsupported(args, given)
    _check_parallel(args, fields)
    _check_backend(args, given)
    _check_distributed_optimizer(args)
    _check_data(args)
    _check_registry(args)


def _check_fixed_and_unsupported(args, given) -> None:
    for dest, (value, why) in FIXED_ARGS.items():
        if value is None or dest not in given:
            continue
        got = getattr(args, dest)
        got = got[0] if isinstance(got, list) and len(got) == 1 else got
        if got != value:
            raise LaunchError(f"{_flag(dest)} {got!r}: {why}, so it must be {value!r} (or left out)")
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
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    heads, experts = fields["num_attention_heads"], fields.get("n_routed_experts")
    if heads % tp:
        raise LaunchError(f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size "
                          f"{tp}: choose a TP size that divides the head count")
    moe = _has_moe(fields)
    if moe and experts % ep:
        raise LaunchError(f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}: "
                          "choose an EP size that divides the expert count")
    if moe and tp > 1 and not args.sequence_parallel:
        raise LaunchError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")


def _check_backend(args, given) -> None:
    if args.cpu:
        for dest, value in CPU_FLAGS.items():
            if dest in given and getattr(args, dest) != value:
                raise LaunchError(f"--cpu runs with {_flag(dest)}={value!r}; drop {_flag(dest)}")
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
        for prefix in _prefixes(paths or []):
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
    from . import registry

    for table, dest, what in ((registry.DISPATCHERS, "moe_token_dispatcher_type", "--moe-token-dispatcher-type"),
                              (registry.SCHEDULES, "pipeline_schedule", "--pipeline-schedule")):
        if getattr(args, dest) not in table:
            raise LaunchError(f"{what} {getattr(args, dest)!r} is not registered; choose one of {sorted(table)}")


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
    for prefix in _prefixes(args.data_path):
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


def _prefixes(paths: list[str]) -> list[str]:
    """Dataset prefixes of a Megatron data-path list ('prefix' or 'w1 prefix1 w2 prefix2 ...')."""
    if len(paths) > 1 and len(paths) % 2 == 0:
        try:
            float(paths[0])
            return paths[1::2]
        except ValueError:
            pass
    return list(paths)


# ----------------------------------------------------------------------------------------------
# DSv3 fields -> Megatron args; Megatron args -> DSv3Config
# ----------------------------------------------------------------------------------------------
def _has_moe(fields: dict) -> bool:
    return fields["first_k_dense_replace"] < fields["num_layers"] or bool(fields.get("mtp_num_layers"))


def apply_to_megatron_args(args: argparse.Namespace, fields: dict) -> argparse.Namespace:
    """Write the resolved model into Megatron's args (the same model for every Megatron reader)."""
    for dest, (value, _) in FIXED_ARGS.items():
        if value is not None:
            setattr(args, dest, [value] if dest == "moe_router_load_balancing_type" else value)
    for field, dest in FIELD_FLAGS.items():
        setattr(args, dest, fields.get(field))
    rope = fields.get("rope_scaling")
    args.rope_type = "yarn" if rope else "rope"
    for key, dest in YARN_FLAGS.items():
        setattr(args, dest, rope[key] if rope else getattr(args, dest))
    if not rope:
        args.rotary_scaling_factor = 1.0
    if _has_moe(fields):
        args.moe_shared_expert_intermediate_size = (fields["n_shared_experts"] * fields["moe_intermediate_size"]
                                                    if fields["n_shared_experts"] else None)
        k, L = fields["first_k_dense_replace"], fields["num_layers"]
        args.moe_layer_freq = [0] * k + [1] * (L - k)
        args.moe_router_enable_expert_bias = fields["scoring_func"] == "sigmoid"
        if args.moe_router_bias_update_rate is None:
            args.moe_router_bias_update_rate = 0.0
    else:
        args.num_experts = None
    args.kv_channels = fields["v_head_dim"]
    if args.mtp_num_layers is None:
        args.mtp_loss_scaling_factor = 0.0
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
    return DSv3Config(**kwargs)




# ----------------------------------------------------------------------------------------------
# What megatron.training's pretrain() calls
# ----------------------------------------------------------------------------------------------
def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron.training import get_args, print_rank_0

    from . import metrics
    from .spec import build_model

    args = get_args()
    cfg = model_config_from_args(args)
    print_rank_0(f"> building DeepSeek-V3 model ({args.dsv3_preset or args.dsv3_hf_config}): "
                 f"{cfg.num_layers} layers, {cfg.n_routed_experts} experts, MTP depth {cfg.mtp_num_layers or 0}")
    model = build_model(cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                        pg_collection=pg_collection)
    metrics.register_chunk(model)
    return model


def _dataset_config(args):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        blend_per_split=blend_per_split, split=args.split, num_dataset_builder_threads=1,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False, mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPTDataset (blending, splits, caching) on every first/last pipeline-stage rank."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()

    def on_this_rank():
        # MTP on the last stage embeds the input tokens too, so both ends read the data.
        return parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()

    cls = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building {cls.__name__} train/valid/test datasets")
    return BlendedMegatronDatasetBuilder(cls, train_val_test_num_samples, on_this_rank,
                                         _dataset_config(args)).build()


# Every TP rank of a first/last stage builds and reads the same samples (no TP broadcast needed).
datasets_provider.is_distributed = True


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    from megatron.training import get_args, get_timers

    from . import metrics

    args = get_args()
    timers = get_timers()
    metrics.apply_coefficient_schedules(model, args)
    timers("batch-generator", log_level=2).start()
    batch = next(data_iterator) if data_iterator is not None else None
    timers("batch-generator").stop()
    if batch is None:   # a middle pipeline stage: input comes from the previous stage
        tokens = position_ids = labels = loss_mask = None
    else:
        tokens, labels = batch["tokens"].cuda(), batch["labels"].cuda()
        loss_mask, position_ids = batch["loss_mask"].cuda(), batch["position_ids"].cuda()
    output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def loss_func(loss_mask, output_tensor):
    """Sum of masked token losses, token count, and the 'lm loss' report (Megatron's convention)."""
    import torch

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


# ----------------------------------------------------------------------------------------------
def prepare(argv: list[str]) -> argparse.Namespace:
    """Parse, check and resolve a launch (no process group is built here)."""
    args, given = parse(argv)
    if args.cpu:
        for dest, value in CPU_FLAGS.items():
            setattr(args, dest, value)
    fields = resolve_model_fields(args, given)
    check_launch(args, given, fields)
    notes = []
    for dest in ("attention_dropout", "hidden_dropout"):
        if dest not in given:   # Megatron's default is 0.1; DeepSeek-V3 trains without dropout
            setattr(args, dest, 0.0)
            notes.append(f"{_flag(dest)} 0.0")
    if args.ranks_per_node is None and os.environ.get("LOCAL_WORLD_SIZE"):
        args.ranks_per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        notes.append(f"--ranks-per-node {args.ranks_per_node} (LOCAL_WORLD_SIZE)")
    if notes and int(os.environ.get("RANK", "0")) == 0:
        print("[dsv3] from the DSv3 model / launch environment: " + ", ".join(notes), flush=True)
    apply_to_megatron_args(args, fields)
    args.dsv3_fields = fields
    args.dsv3_given = sorted(given)
    if args.export_hf is not None:
        args.skip_train = True     # load the model only: no optimizer, no training steps
        args.no_load_optim = args.no_load_rng = True
    return args


def validate_model(args: argparse.Namespace) -> None:
    """Build the DSv3Config once with the validated args (vocab comes from the tokenizer later)."""
    try:
        model_config_from_args(_with(args, padded_vocab_size=args.tensor_model_parallel_size * 128))
    except (DSv3ConfigError, AssertionError, ValueError) as e:
        raise LaunchError(f"invalid DeepSeek-V3 model: {e}") from None


def _with(args, **kw):
    ns = argparse.Namespace(**vars(args))
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cpu" in argv or cpu_backend.requested():
        if "--cpu" not in argv:
            argv.append("--cpu")
        cpu_backend.enable()
    args = prepare(argv)

    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import validate_args
    from megatron.training.global_vars import set_global_variables

    from . import metrics, patches, registry
    from .patches import reparse_args

    reparse_args.EXTRA_ARGS[0] = _extra_args
    sys.argv = [sys.argv[0] if sys.argv else "dsv3-pretrain", *argv]   # what Megatron re-parses
    patches.apply(patches.training_patches())
    if args.cpu:
        cpu_backend.enable_training()
    validate_args(args, {})
    validate_model(args)
    set_global_variables(args)
    registry.install_schedule(args.pipeline_schedule)
    metrics.install(args)

    from megatron.training.training import pretrain

    pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)
    if args.export_hf is not None:
        import torch

        from . import hf

        hf.save(metrics._CHUNKS[0], args.export_hf, dtype=getattr(torch, args.export_hf_dtype))
        if torch.distributed.get_rank() == 0:
            print(f"[dsv3] wrote HF checkpoint of {args.load} (iteration {args.iteration}) to "
                  f"{args.export_hf}", flush=True)


if __name__ == "__main__":
    main()
