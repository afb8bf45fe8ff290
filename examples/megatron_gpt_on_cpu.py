"""A stock pretrain_gpt-style Megatron-Core script (Megatron-Core's own GPTModel from its local spec,
Megatron-LM's own arguments, its own ``megatron.training.pretrain`` loop) with nothing of megatron-dsv3
in it -- run on CPU with gloo by megatron-dsv3's CPU backend:

    # the script unchanged, launched through the CPU backend's runner:
    torchrun --nproc-per-node 2 -m megatron_dsv3.cpu_backend examples/megatron_gpt_on_cpu.py \\
        --tensor-model-parallel-size 2 --num-layers 2 --hidden-size 64 --num-attention-heads 4 \\
        --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 4 \\
        --train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 255 \\
        --eval-iters 0 --eval-interval 1000
    # or add one line at the top of any such script, before it imports megatron.training:
    #     import megatron_dsv3.cpu_backend; megatron_dsv3.cpu_backend.enable(training=True)

The CPU backend applies its settings inside Megatron's argument validation (gloo, local layers,
fp32, CPU initialisation, fusions off); a flag given with a value the CPU cannot run is an error.
"""
from functools import partial

import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.training import get_args, get_tokenizer, pretrain
from megatron.training.argument_utils import (
    core_transformer_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_and_validate_args


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    args = get_args()
    config = core_transformer_config_from_args(args)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(
            args.num_experts, args.moe_grouped_gemm, normalization=args.normalization),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, vp_stage=vp_stage,
        pg_collection=pg_collection)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=None, split=args.split,
        tokenizer=get_tokenizer(), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(MockGPTDataset, train_val_test_num_samples, lambda: True,
                                         config).build()


datasets_provider.is_distributed = True     # every rank reads the (mock) samples itself


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1).float()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens, labels = batch["tokens"].cuda(), batch["labels"].cuda()
    loss_mask, position_ids = batch["loss_mask"].cuda(), batch["position_ids"].cuda()
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask)


if __name__ == "__main__":
    args = parse_and_validate_args()
    pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)
