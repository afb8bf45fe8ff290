"""Multi-Token Prediction module (DeepSeek-V3 report sec. 2.2).

Depth k (1..D), position i:

    u_i   = eh_proj([RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k-1}_i)])     embedding FIRST
    h^k   = DecoderLayer(u)                                             causal over the sequence
    out_k = RMSNorm_shared_head(h^k)  -> shared output head predicts t_{i+k+1}

h^0 is the main model's final hidden state after its final norm. Embedding and output head are the
main model's (shared). The module keeps the full sequence length and rolls the token ids left by one
per depth, as Megatron-Core's MTP block does; the last k positions of depth k see no real token and
are excluded from the loss (L_MTP = lambda / D * sum_k CE_k, computed by Megatron's process_mtp_loss
inside GPTModel). Causality keeps positions < s-k exact.

This class plugs into Megatron-Core's ``MultiTokenPredictionBlock`` through the layer spec.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import roll_tensor
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import make_viewless_tensor


class DSv3MTPLayer(MegatronModule):
    """One MTP depth. Submodules (spec): norm class, eh_proj linear class, decoder layer spec."""

    def __init__(self, config, submodules: dict, layer_number: int = 1, vp_stage: Optional[int] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, **_unused):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.layer_number = layer_number
        self.cp_group = pg_collection.cp
        norm = submodules["norm"]
        h = config.hidden_size
        self.enorm = norm(config=config, hidden_size=h, eps=config.layernorm_epsilon)
        self.hnorm = norm(config=config, hidden_size=h, eps=config.layernorm_epsilon)
        # Duplicated on TP ranks: under sequence parallelism each rank projects its own tokens.
        self.eh_proj = build_module(submodules["eh_proj"], 2 * h, h, config=config,
                                    init_method=config.init_method, bias=False)
        self.mtp_model_layer = build_module(submodules["layer"], config=config, layer_number=layer_number,
                                            vp_stage=vp_stage, is_mtp_layer=True,
                                            pg_collection=pg_collection)
        self.final_layernorm = norm(config=config, hidden_size=h, eps=config.layernorm_epsilon)

    def forward(self, input_ids, position_ids, hidden_states, attention_mask, padding_mask=None,
                embedding=None, packed_seq_params=None, **_unused):
        """hidden_states h^{k-1} [s_l, b, h] -> (h^k after the shared-head norm, rolled ids/positions)."""
        if packed_seq_params is not None:
            raise NotImplementedError("DSv3MTPLayer: packed sequences are not supported yet")
        input_ids, _ = roll_tensor(input_ids, shifts=-1, dims=-1, cp_group=self.cp_group)
        position_ids, _ = roll_tensor(position_ids, shifts=-1, dims=-1, cp_group=self.cp_group)
        if padding_mask is not None:
            padding_mask, _ = roll_tensor(padding_mask, shifts=-1, dims=-1, cp_group=self.cp_group)
        emb = embedding(input_ids=input_ids, position_ids=position_ids)       # [s_l, b, h]
        # Under sequence parallelism dropout draws from the model-parallel RNG stream (each TP rank
        # holds other tokens), as in Megatron's decoder block and MTP layer.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        with rng:
            u = torch.cat((self.enorm(emb), self.hnorm(hidden_states)), dim=-1)
            u, _ = self.eh_proj(u)
            u = make_viewless_tensor(inp=u, requires_grad=True, keep_graph=True)
            h, _ = self.mtp_model_layer(hidden_states=u, attention_mask=attention_mask)
        h = self.final_layernorm(h)
        h = make_viewless_tensor(inp=h, requires_grad=True, keep_graph=True)
        return h, input_ids, position_ids, padding_mask


def mtp_layer_spec(layer_spec: ModuleSpec, norm: type, linear: type) -> ModuleSpec:
    return ModuleSpec(module=DSv3MTPLayer,
                      submodules={"norm": norm, "eh_proj": linear, "layer": layer_spec})
