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
    model = build_model(cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                        pg_collection=pg_collection)
    MODEL_CHUNKS.append(model)
    metrics.attach(model)
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

    from . import coefficients

    args = get_args()
    timers = get_timers()
    coefficients.apply(model, args)
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
