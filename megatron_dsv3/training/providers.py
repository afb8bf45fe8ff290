"""What ``megatron.training.pretrain`` calls: the model provider (our DSv3 GPTModel), the dataset
provider (Megatron's GPTDataset), the forward step and the loss function."""
from __future__ import annotations

from functools import partial

from .arguments import model_config_from_args

#: The model chunks this rank built (the HF export reads them after pretrain() returns).
MODEL_CHUNKS: list = []


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron.training import get_args, print_rank_0

    from ..model.spec import build_model
    from . import metrics

    args = get_args()
    cfg = model_config_from_args(args)
    print_rank_0(f"> building DeepSeek-V3 model ({args.dsv3_preset or args.dsv3_hf_config}): "
                 f"{cfg.num_layers} layers, {cfg.n_routed_experts} experts, MTP depth {cfg.mtp_num_layers or 0}")
    chunks = _schedule_chunks(args, cfg, pg_collection)
    if chunks is not None:       # DualPipe / DualPipeV: this rank's two stages, from the schedule
        _init_from_hf(args, chunks)
        for chunk in chunks:
            MODEL_CHUNKS.append(chunk)
            metrics.attach(chunk)
        return chunks
    model = build_model(cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                        pg_collection=pg_collection)
    _init_from_hf(args, [model])
    MODEL_CHUNKS.append(model)
    metrics.attach(model)
    return model


def _init_from_hf(args, chunks) -> None:
    """--hf-checkpoint: this rank's shards of the HF weights (not read when --load resumes a checkpoint,
    which Megatron loads over them)."""
    if not getattr(args, "hf_checkpoint", None):
        return
    from megatron.training import print_rank_0

    from ..checkpoint.hf_init import init_from_hf
    from . import safety

    if args.load and safety.find_checkpoint(args.load, args.ckpt_step) is not None:
        print_rank_0(f"> --hf-checkpoint {args.hf_checkpoint} not read: --load {args.load} holds a checkpoint")
        return
    init_from_hf(chunks, args.hf_checkpoint)
    print_rank_0(f"> initialised the model from the HF checkpoint {args.hf_checkpoint}")


def _schedule_chunks(args, cfg, pg_collection):
    """The chunks a registered schedule places itself (its ``build_model_chunks``), or None."""
    from megatron.core.enums import ModelType
    from megatron.core.process_groups_config import ProcessGroupCollection

    from .. import registry
    from ..model.mla import DuplicatedLinear
    from ..model.spec import build_model

    schedule = registry.resolve(registry.SCHEDULES, args.pipeline_schedule, "--pipeline-schedule")
    build = getattr(schedule, "build_model_chunks", None)
    if build is None:
        return None
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    chunks = build(partial(build_model, cfg), cfg, pg_collection, replicated_linears=(DuplicatedLinear,))
    for chunk in chunks:
        chunk.model_type = ModelType.encoder_or_decoder
    return chunks


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
        # the per-document causal mask (Megatron's bool [1, s, s], True = masked) only when it differs
        # from the plain causal one our attention applies without a mask
        create_attention_mask=bool(args.reset_attention_mask),
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPTDataset (blending, splits, caching) on every first/last pipeline-stage rank, and
    on every rank with --reset-attention-mask (each stage's attention needs the document mask; the
    dataset is a memory map, and each stage reads the same samples in the same order)."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()

    def on_this_rank():
        # MTP on the last stage embeds the input tokens too, so both ends read the data.
        return (bool(args.reset_attention_mask) or parallel_state.is_pipeline_first_stage()
                or parallel_state.is_pipeline_last_stage())

    cls = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building {cls.__name__} train/valid/test datasets")
    return BlendedMegatronDatasetBuilder(cls, train_val_test_num_samples, on_this_rank,
                                         _dataset_config(args)).build()


# Every TP rank of a first/last stage builds and reads the same samples (no TP broadcast needed).
datasets_provider.is_distributed = True


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    from megatron.training import get_args, get_timers

    from . import coefficients

    args = get_args()
    timers = get_timers()
    coefficients.apply(model, args)
    timers("batch-generator", log_level=2).start()
    batch = next(data_iterator) if data_iterator is not None else None
    timers("batch-generator").stop()
    if batch is None:   # a middle pipeline stage: input comes from the previous stage
        tokens = position_ids = labels = loss_mask = attention_mask = None
    else:
        tokens, labels = batch["tokens"].cuda(), batch["labels"].cuda()
        loss_mask, position_ids = batch["loss_mask"].cuda(), batch["position_ids"].cuda()
        # --reset-attention-mask: [b, 1, s, s] bool, True = masked (Megatron's convention)
        attention_mask = batch["attention_mask"].cuda() if "attention_mask" in batch else None
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def loss_func(loss_mask, output_tensor):
    """Sum of masked token losses, token count, and the 'lm loss' report (Megatron's convention)."""
    import torch

    from . import safety

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    safety.note_loss(loss)     # the step guard's per-micro-batch NaN/Inf flag (no host sync)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}
