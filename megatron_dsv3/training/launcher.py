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
...: the table in :mod:`megatron_dsv3.config.mapping`). What the launcher adds:

1. checks the launch before any process group exists (flag named in every error);
2. resolves the DSv3 model, writes it back into Megatron's args (so Megatron's FLOP count, logging,
   pipeline layout and checkpoint checks see the same model) and builds it from our specs;
3. resolves ``--moe-token-dispatcher-type`` and ``--pipeline-schedule`` through
   :mod:`megatron_dsv3.registry`;
4. applies the token-keyed gamma / lambda schedules each step, and logs DSv3 metrics
   (:mod:`megatron_dsv3.training.metrics`) to the console and W&B.

The expert-bias update itself is Megatron-Core's ``finalize_model_grads`` step hook: after each
global batch the per-expert token counts of our router are summed over the TP x DP x CP ranks that
route for the layer and every bias moves by gamma * sign(mean - count).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..compat import cpu_backend
from ..config import DSv3ConfigError
from ..config.mapping import flag_name
from .arguments import (  # noqa: F401  (the launcher's public names)
    LaunchError,
    apply_recipe,
    apply_to_megatron_args,
    build_parser,
    extra_args,
    model_config_from_args,
    parse,
    resolve_model_fields,
)
from . import safety
from .checks import check_launch
from .providers import MODEL_CHUNKS, datasets_provider, forward_step, model_provider


# ----------------------------------------------------------------------------------------------
def prepare(argv: list[str]) -> argparse.Namespace:
    """Parse, check and resolve a launch (no process group is built here)."""
    args, given = parse(argv)
    recipe = apply_recipe(args, given)
    if recipe and int(os.environ.get("RANK", "0")) == 0:
        print(f"[dsv3] the {args.dsv3_preset} preset's training recipe (report sec. 4.2; flags you give win): "
              + ", ".join(recipe), flush=True)
    fields = resolve_model_fields(args, given)
    check_launch(args, given, fields)
    notes = []
    for dest in ("attention_dropout", "hidden_dropout"):
        if dest not in given:   # Megatron's default is 0.1; DeepSeek-V3 trains without dropout
            setattr(args, dest, 0.0)
            notes.append(f"{flag_name(dest)} 0.0")
    if args.ranks_per_node is None and os.environ.get("LOCAL_WORLD_SIZE"):
        args.ranks_per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        notes.append(f"--ranks-per-node {args.ranks_per_node} (LOCAL_WORLD_SIZE)")
    if notes and int(os.environ.get("RANK", "0")) == 0:
        print("[dsv3] from the DSv3 model / launch environment: " + ", ".join(notes), flush=True)
    for note in safety.launch_settings(args, given):    # step guard settings, a fresh --load
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[dsv3] {note}", flush=True)
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
    from megatron.training import arguments as megatron_args
    from megatron.training.global_vars import set_global_variables

    from .. import registry
    from ..compat import patches
    from ..compat.patches import reparse_args
    from . import coefficients, metrics

    reparse_args.EXTRA_ARGS[0] = extra_args
    safety.install(args)          # the hooks of the checkpoint_safety / nonfinite_step_guard patches
    sys.argv = [sys.argv[0] if sys.argv else "dsv3-pretrain", *argv]   # what Megatron re-parses
    patches.apply(patches.training_patches())
    if args.cpu:
        cpu_backend.enable(training=True)
    with safety.error_exits_nonzero():         # Megatron's exit code 0 after an error -> 1
        megatron_args.validate_args(args, {})      # (the CPU backend's cpu_arguments patch wraps it)
        validate_model(args)
        set_global_variables(args)
        registry.install_schedule(args.pipeline_schedule)
        coefficients.install(args)
        metrics.install(args)

        from megatron.training.training import pretrain

        pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
                 forward_step, model_provider=model_provider)
        if args.export_hf is not None:
            import torch

            from ..checkpoint.hf_writer import save

            loaded = safety.require_loaded_checkpoint(args)    # never export untrained weights
            save(MODEL_CHUNKS[0], args.export_hf, dtype=getattr(torch, args.export_hf_dtype))
            if torch.distributed.get_rank() == 0:
                print(f"[dsv3] wrote HF checkpoint of {loaded.path} (iteration {args.iteration}) to "
                      f"{args.export_hf}", flush=True)


if __name__ == "__main__":
    main()
