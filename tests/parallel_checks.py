"""Rank bodies for tests/test_parallel.py (importable by spawned processes)."""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

LAYOUTS = {"TP2": dict(tp=2, ep=1), "EP2": dict(tp=1, ep=2), "TP2xEP2": dict(tp=2, ep=2)}


def loss_and_grads(model, ids, labels):
    """Mean LM loss (+ MTP and balance losses attached inside the model), backward."""
    model.train()
    model.zero_grad()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    return loss.detach()


def sync_grads(model):
    """What DDP + finalize_model_grads do for these params: sum sequence-parallel grads over TP, then
    average over data parallel (experts: sum over expert-DP of grads scaled by 1/DP)."""
    from megatron.core import parallel_state as ps

    tp_group, dp = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_world_size()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if getattr(p, "sequence_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(p.grad, group=tp_group)
        p.grad /= dp
        expert = ".mlp.experts.local_experts." in name   # routed experts live on expert groups
        group = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
        dist.all_reduce(p.grad, group=group)


def parity(rank: int, ckpt: str, ref_path: str, out_path: str):
    from megatron.core import parallel_state as ps

    from megatron_dsv3 import hf
    from megatron_dsv3.parallel.world import init_model_parallel

    ref = torch.load(ref_path)
    report = {}
    for name, sizes in LAYOUTS.items():
        init_model_parallel(**sizes)
        model = hf.load(ckpt)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        ids = ref["ids"].chunk(dp)[dp_rank]
        labels = ref["labels"].chunk(dp)[dp_rank]
        rows = slice(dp_rank * ids.shape[0], (dp_rank + 1) * ids.shape[0])
        err = {"logits": (hf.logits(model, ids) - ref["logits"][rows]).abs().max().item(),
               "mtp": (hf.mtp_logits(model, ids)[0] - ref["mtp"][rows]).abs().max().item()}
        loss = loss_and_grads(model, ids, labels)
        sync_grads(model)
        grads = hf.to_hf_state_dict(model, grads=True)
        assert set(grads) == set(ref["grads"]), sorted(set(grads) ^ set(ref["grads"]))[:3]
        worst = max(((g - ref["grads"][k]).abs().max() / ref["grads"][k].abs().max().clamp(min=1e-30)).item()
                    for k, g in grads.items())
        losses = torch.zeros(dp)
        losses[dp_rank] = loss
        dist.all_reduce(losses, group=ps.get_data_parallel_group())
        err["grad_rel"] = worst
        err["loss_rel"] = abs(losses.mean().item() - ref["loss"]) / abs(ref["loss"])
        err["sequence_parallel"] = bool(model.config.sequence_parallel)
        report[name] = err
        del model
    report["balance_loss_sp"] = balance_loss_under_sequence_parallelism()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


def balance_loss_under_sequence_parallelism() -> dict:
    """The sequence-wise balance loss with the sequence split over a TP group of 2 (sequence
    parallel): each rank sees its slice of every sequence; summed over the TP ranks the losses (and
    the gradients of the scores) equal the full-sequence computation on one rank."""
    from megatron.core import parallel_state as ps

    from megatron_dsv3.model.router import sequence_balance_loss
    from megatron_dsv3.parallel.world import init_model_parallel

    init_model_parallel(tp=2)
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    s, b, E, K, alpha = 8, 3, 8, 2, 1e-2
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(s * b, E, generator=g, dtype=torch.float64)             # [s, b] token order
    routing = torch.zeros(s * b, E, dtype=torch.bool).scatter(1, scores.topk(K, dim=1).indices, True)
    full_scores = scores.clone().requires_grad_(True)
    full = sequence_balance_loss(full_scores, routing, s, b, K, alpha)
    full.backward()
    rows = slice(r * (s // tp) * b, (r + 1) * (s // tp) * b)                 # this rank's s/TP positions
    mine = scores[rows].clone().requires_grad_(True)
    part = sequence_balance_loss(mine, routing[rows], s, b, K, alpha, ps.get_tensor_model_parallel_group())
    part.backward()
    total = part.detach().clone()
    dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
    return {"loss_rel": abs(total.item() - full.item()) / abs(full.item()),
            "grad_abs": (mine.grad - full_scores.grad[rows]).abs().max().item()}
