"""The auxiliary-loss-free DeepSeek-V3 router (report sec. 2.1.2), for Megatron-Core's MoELayer.

Legend: T tokens (local), E routed experts, G groups, K experts per token.

    s = sigmoid(x W^T)                      [T, E]  fp32 (softmax for DeepSeek-V2)
    c = s + b                               the per-expert bias b only CHOOSES experts
    group score = sum of the top-2 c of each of the G groups; keep the best topk_group groups
    chosen = top-K of c over the kept groups
    w_e = s_e / sum_chosen s * routed_scaling_factor     (unbiased s; no token dropping)

The bias is a buffer (no gradient). ``local_tokens_per_expert`` counts the tokens routed in training
steps, under the names Megatron-Core's finalize_model_grads reads to move the bias by gamma against
the load after each optimizer step. The sequence-wise balance loss
``alpha * sum_e f_e P_e`` (f_e = E/(K T_seq) * tokens of the sequence on e, P_e = mean_t s_e/sum_j s_j)
is attached to the routing weights with Megatron's MoEAuxLossAutoScaler in training.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_metrics_tracker


def route(logits: torch.Tensor, *, top_k: int, n_group: int, topk_group: int, scoring: str,
          bias: Optional[torch.Tensor], norm_topk_prob: bool, scaling: float):
    """Pure routing maths. logits [T, E] fp32 -> (scores [T, E], weights [T, K], indices [T, K])."""
    scores = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores if bias is None else scores + bias
    T, E = choice.shape
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        if bias is not None:   # noaux_tc: a group is as good as its two best experts
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:                  # DeepSeek-V2 group_limited_greedy: its best expert
            group_score = grouped.amax(dim=-1)
        kept = group_score.topk(topk_group, dim=-1).indices
        keep = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device).scatter_(1, kept, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    indices = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, weights * scaling, indices


def sequence_balance_loss(scores: torch.Tensor, routing_map: torch.Tensor, seq_len_total: int, bsz: int,
                          top_k: int, alpha: float, tp_group=None) -> torch.Tensor:
    """alpha * mean over sequences of sum_e f_e P_e, for this rank's slice of each sequence.

    scores, routing_map: [s_local * b, E] in Megatron's [s, b] token order. Under sequence parallelism
    the counts f_e are summed over ``tp_group``; the P_e term holds only local tokens, so summing the
    returned loss over TP ranks gives the full loss (as TP-summed router gradients do).
    """
    E = scores.shape[-1]
    counts = routing_map.view(-1, bsz, E).sum(dim=0).to(scores.dtype)           # [b, E]
    if tp_group is not None and tp_group.size() > 1:
        torch.distributed.all_reduce(counts, group=tp_group)
    f = counts * (E / (top_k * seq_len_total))
    p = (scores / scores.sum(dim=-1, keepdim=True)).view(-1, bsz, E).sum(dim=0) / seq_len_total
    return alpha * (f * p).sum(dim=-1).mean()


class DSv3Router(MegatronModule):
    """Router with Megatron's interface: ``forward(x [s, b, h], padding_mask) -> (probs, routing_map)``.

    probs [T, E] holds the combine weight of each chosen expert (0 elsewhere); routing_map [T, E] bool.
    """

    def __init__(self, config, pg_collection: Optional[ProcessGroupCollection] = None,
                 is_mtp_layer: bool = False, **_unused):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.tp_group = pg_collection.tp
        self.is_mtp_layer = is_mtp_layer
        self.layer_number = None
        E = config.n_routed_experts
        self.num_experts = E
        self.weight = torch.nn.Parameter(torch.empty(E, config.hidden_size, dtype=torch.float32))
        if config.perform_initialization:
            config.init_method(self.weight)
        self.weight.data = self.weight.data.to(config.params_dtype)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        self.use_bias = config.scoring_func == "sigmoid"
        if self.use_bias:
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
            self.register_buffer("local_tokens_per_expert", torch.zeros(E, dtype=torch.float32),
                                 persistent=False)
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number

    def _log_balance_loss(self, value: torch.Tensor):
        """Megatron's MoE metrics tracker, as 'seq_load_balancing_loss' (without alpha, its convention)."""
        if self.layer_number is None:
            return
        c = self.config
        layer = self.layer_number + (c.num_layers if self.is_mtp_layer else 0)
        total = c.num_layers + (c.mtp_num_layers or 0)
        tracker = get_moe_metrics_tracker()
        entry = tracker.metrics.get("seq_load_balancing_loss")
        if entry is not None and entry.values.numel() != total:
            # The tracker is process-wide and sized by the first model that logged; another model
            # of a different depth in the same process (tests, evaluation) starts it afresh.
            del tracker.metrics["seq_load_balancing_loss"]
        tracker.record("seq_load_balancing_loss", value, layer, total, reduce_group=self.tp_group,
                       needs_dp_avg=True)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        c = self.config
        if padding_mask is not None:
            raise NotImplementedError("DSv3Router: padding masks are not supported yet")
        s_local, bsz = x.shape[0], x.shape[1]
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), self.weight.float())
        bias = self.expert_bias.float() if self.use_bias else None
        scores, weights, indices = route(
            logits, top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
            scoring=c.scoring_func, bias=bias, norm_topk_prob=c.norm_topk_prob,
            scaling=c.routed_scaling_factor)
        probs = torch.zeros_like(scores).scatter(1, indices, weights)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, indices, True)

        if self.training and torch.is_grad_enabled():
            if self.use_bias:
                with torch.no_grad():
                    self.local_tokens_per_expert += routing_map.sum(dim=0)
            if c.seq_aux_alpha > 0:
                sp = c.sequence_parallel and self.tp_group.size() > 1
                seq_len = s_local * (self.tp_group.size() if sp else 1)
                loss = sequence_balance_loss(scores, routing_map, seq_len, bsz, c.num_experts_per_tok,
                                             c.seq_aux_alpha, self.tp_group if sp else None)
                self.last_seq_aux_loss = loss.detach()
                self._log_balance_loss(loss.detach() / c.seq_aux_alpha)
                probs = MoEAuxLossAutoScaler.apply(probs, loss)
        return probs.to(x.dtype), routing_map
