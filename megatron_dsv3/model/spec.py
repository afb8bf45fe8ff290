"""Megatron-Core layer specs for DeepSeek-V3, and the model builder.

The model is Megatron-Core's ``GPTModel`` (embedding, decoder block, final norm, output head, MTP
block, pipeline stages, losses) with every DSv3 part swapped in through specs:

    embed -> [TransformerLayer(RMSNorm, MultiLatentAttention, RMSNorm, dense SwiGLU | MoE)] x L
          -> RMSNorm -> head                       (+ DSv3MTPLayer x D sharing embed and head)

MoE = Megatron's ``MoELayer`` (token dispatcher, experts, shared experts) with our ``DSv3Router``.
The model class is :class:`DSv3GPTModel`: ``GPTModel`` whose LM and MTP cross entropy is torch's
``F.cross_entropy`` when the vocabulary is not split (below).
One spec function serves the local (CPU) and Transformer Engine builds (backend chosen from
``config.transformer_impl``). Megatron-LM style: ``--spec megatron_dsv3.spec get_dsv3_decoder_block_spec`` (``megatron_dsv3.spec``
re-exports this module's builders).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    get_mtp_num_layers_to_build,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from ..compat import patches
from ..compat.patches import checkpoint_without_output_fp8, quiet_gpt_deprecation
from ..config import DSv3Config
from ..registry import SPECS, register
from .backends import backend_for, mtp_decoder_layer
from .linear import LocalColumnParallelLinear
from .mla import MLASubmodules, MultiLatentAttention
from .moe import DSv3MoELayer
from .mtp import mtp_layer_spec
from .router import DSv3Router


def build_topology(config: DSv3Config, pg_collection=None):
    """The node topology the configured token dispatcher needs, or None. COLLECTIVE over the world
    when one is built: every rank calls it at the same point (``build_model`` does)."""
    from megatron.core import parallel_state

    from ..parallel.topology import NodeTopology
    from ..registry import registered_dispatcher

    cls = registered_dispatcher(config.token_dispatcher) if config.token_dispatcher else None
    if not getattr(cls, "needs_topology", False) or not config.num_moe_experts:
        return None
    if not config.ranks_per_node:
        raise ValueError(f"token_dispatcher={config.token_dispatcher!r} needs config.ranks_per_node "
                         "(--ranks-per-node): GPUs per node")
    ep = getattr(pg_collection, "ep", None) if pg_collection is not None else None
    if ep is None:
        ep = parallel_state.get_expert_model_parallel_group()
    return NodeTopology.build(ep, config.ranks_per_node)


@register(SPECS, "layer")
def get_dsv3_layer_spec(config: DSv3Config, moe: bool, topology=None) -> ModuleSpec:
    """One decoder layer: MLA attention, then dense SwiGLU (moe=False) or DeepSeekMoE.

    ``topology``: the node topology for dispatchers that need one (:func:`build_topology`)."""
    b = backend_for(config)
    attention = ModuleSpec(
        module=MultiLatentAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASubmodules(
            linear_q_proj=b.column, linear_q_down_proj=b.duplicated, linear_q_up_proj=b.column,
            linear_kv_down_proj=b.duplicated, linear_kv_up_proj=b.column, linear_proj=b.row,
            q_layernorm=b.norm, kv_layernorm=b.norm),
    )
    swiglu = MLPSubmodules(linear_fc1=b.column, linear_fc2=b.row)
    if moe:
        mlp = partial(DSv3MoELayer, submodules=MoESubmodules(
            experts=b.experts, shared_experts=partial(SharedExpertMLP, submodules=swiglu),
            router=DSv3Router), topology=topology)
    else:
        mlp = partial(MLP.as_mlp_submodule, submodules=swiglu)
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=b.norm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=b.norm, mlp=mlp, mlp_bda=get_bias_dropout_add))


@register(SPECS, "decoder_block")
def get_dsv3_decoder_block_spec(config: DSv3Config, use_transformer_engine: Optional[bool] = None,
                                vp_stage: Optional[int] = None, pp_rank: Optional[int] = None,
                                topology=None, **_unused) -> TransformerBlockSubmodules:
    """The decoder layers of this pipeline stage (dense or MoE as ``config.is_moe_layer`` says)."""
    dense = get_dsv3_layer_spec(config, moe=False)
    moe = get_dsv3_layer_spec(config, moe=True, topology=topology)
    specs = [moe if config.is_moe_layer(i) else dense for i in range(config.num_layers)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count],
                                      layer_norm=backend_for(config).norm)


@register(SPECS, "mtp_block")
def get_dsv3_mtp_block_spec(config: DSv3Config, vp_stage: Optional[int] = None,
                            pp_rank: Optional[int] = None,
                            topology=None) -> Optional[MultiTokenPredictionBlockSubmodules]:
    """The D MTP modules (each with a full MoE decoder layer), on the stage that holds them."""
    if not config.mtp_num_layers or get_mtp_num_layers_to_build(config, vp_stage, pp_rank) == 0:
        return None
    b = backend_for(config)
    decoder = get_dsv3_layer_spec(config, moe=True, topology=topology)
    decoder = ModuleSpec(module=mtp_decoder_layer(config, decoder.module), params=decoder.params,
                         submodules=decoder.submodules)       # FP8 context on TE (backends.py)
    layer = mtp_layer_spec(decoder, norm=b.norm, linear=b.mtp_proj or b.duplicated)
    return MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * config.mtp_num_layers)


class DSv3GPTModel(GPTModel):
    """Megatron-Core's ``GPTModel``; when the vocabulary is not split (tensor-parallel size 1), fp32
    logits and no cross-entropy fusion asked for, its LM and MTP losses are torch's
    ``F.cross_entropy`` (one fused kernel with its backward) instead of Megatron's vocab-parallel
    autograd function, whose max / sum all-reduces over a one-rank group and ~15 operators cost
    3.0 vs 0.85 ms per [128 x 4, 767] forward + backward on one CPU thread. Same loss within fp32
    rounding (tests/test_gemm.py::test_cross_entropy_matches_megatrons); otherwise Megatron's."""

    def compute_language_model_loss(self, labels, logits):
        if (self.tp_group.size() > 1 or self.config.cross_entropy_loss_fusion
                or logits.dtype != torch.float32):
            return super().compute_language_model_loss(labels, logits)
        s, b, v = logits.shape                                            # labels [b, s]
        loss = F.cross_entropy(logits.view(s * b, v), labels.transpose(0, 1).reshape(s * b), reduction="none")
        return loss.view(s, b).transpose(0, 1).contiguous()


def build_model(config: DSv3Config, *, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None, pg_collection=None) -> GPTModel:
    """A DeepSeek-V3 GPTModel (this rank's pipeline stage) on the current parallel state.

    Collective when the token dispatcher needs a node topology (every rank must call it)."""
    patches.apply([quiet_gpt_deprecation.PATCH, checkpoint_without_output_fp8.PATCH])
    topology = build_topology(config, pg_collection)
    model = DSv3GPTModel(
        config=config,
        transformer_layer_spec=get_dsv3_decoder_block_spec(config, vp_stage=vp_stage, topology=topology),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",      # MLA applies its own decoupled RoPE
        mtp_block_spec=get_dsv3_mtp_block_spec(config, vp_stage=vp_stage, topology=topology),
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    head = getattr(model, "output_layer", None)
    if config.transformer_impl == "local" and type(head) is tensor_parallel.ColumnParallelLinear:
        # GPTModel builds its output head from Megatron's class, not from the spec: give it the local
        # backend's forward (LocalColumnParallelLinear only adds a forward; parameters, attributes and
        # checkpoint keys stay Megatron's)
        head.__class__ = LocalColumnParallelLinear
    return model
