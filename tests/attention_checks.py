"""Helpers and rank bodies for tests/test_attention.py (importable by spawned processes)."""
from __future__ import annotations

import json

import torch

EOD = 127          # the document separator of the packed test sequences (vocab 128)
#: Document lengths of the two packed samples (24 tokens each).
DOCS = [[7, 10, 7], [12, 5, 7]]
#: Recompute sets compared with no recomputation (Megatron-Core names; "layernorm" needs TE: see
#: test_layernorm_recompute_of_the_latent_norms).
RECOMPUTE_SETS = [["core_attn"], ["mla_up_proj"], ["mla_up_proj", "core_attn"], ["layernorm"], ["mlp"], ["moe"],
                  ["shared_experts"], ["mla_up_proj", "core_attn", "layernorm", "mlp", "moe", "shared_experts"]]


def packed_batch(seed: int = 0):
    """ids [2, 24] (EOD closing every document, nowhere else), Megatron's document mask [2, 1, 24, 24]
    (bool, True = masked) and reset position ids, both as GPTDataset builds them."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    g = torch.Generator().manual_seed(seed)
    rows, masks, positions = [], [], []
    for lengths in DOCS:
        ids = torch.randint(0, EOD, (sum(lengths),), generator=g)
        ids[torch.tensor(lengths).cumsum(0) - 1] = EOD
        mask, _, pos = _get_ltor_masks_and_position_ids(ids, EOD, True, True, False, True)
        rows.append(ids)
        masks.append(mask)
        positions.append(pos)
    return torch.stack(rows), torch.stack(masks), torch.stack(positions)


def documents(row: int):
    """(start, length) of each document of packed sample ``row``."""
    out, start = [], 0
    for n in DOCS[row]:
        out.append((start, n))
        start += n
    return out


def gather_vocab(logits):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


@torch.no_grad()
def masked_logits(model, ids, mask, positions=None):
    """(main logits [b, s, V], depth-1 MTP logits [b, s, V]) with Megatron's attention mask."""
    was_training = model.training
    model.eval()
    pos = positions if positions is not None else torch.arange(ids.shape[1]).expand_as(ids)
    main = gather_vocab(model(ids, pos, mask)).float()
    emb = model.embedding(input_ids=ids, position_ids=pos)
    hidden = model.decoder(hidden_states=emb, attention_mask=mask)
    hidden = model.mtp(input_ids=ids, position_ids=pos, hidden_states=hidden, attention_mask=mask,
                       embedding=model.embedding)
    mtp, _ = model.output_layer(torch.chunk(hidden, 2, dim=0)[1])
    model.train(was_training)
    return main, gather_vocab(mtp).transpose(0, 1).float()


def reseed(seed: int = 77) -> None:
    """The same default and model-parallel RNG states before each compared step."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def train_step(model, ids, labels, mask):
    """Loss, gradients and router token counts of one forward + backward (training mode)."""
    model.train()
    model.zero_grad()
    for m in model.modules():
        if getattr(m, "local_tokens_per_expert", None) is not None:
            m.local_tokens_per_expert.zero_()
    reseed()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    loss = model(ids, pos, mask, labels=labels).float().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    counts = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("local_tokens_per_expert")}
    return loss.detach(), grads, counts


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def worst_rel(got: dict, ref: dict) -> float:
    """max over tensors of max |got - ref| / max |ref|."""
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:3]
    return max(((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-30)).item() for k in ref)


def grads_match(modules, got: dict, ref: dict) -> bool:
    """Bit-identical, except with core_attn and layernorm: Megatron's checkpoints there (reentrant,
    and CheckpointWithoutOutput) run their backward as a nested autograd call, which may change the
    order in which a tensor with several consumers (the embedding, the residual stream) sums its
    gradient contributions: fp32 rounding (seen: 6e-7)."""
    if {"core_attn", "layernorm"} & set(modules):
        return worst_rel(got, ref) <= 1e-6
    return same(got, ref)


def tp2_body(rank: int, ckpt: str, ref_path: str, out_path: str):
    """TP2 + SP: packed documents vs the world-1 per-document logits; recomputation with dropout on
    gives the gradients of no recomputation."""
    import torch.distributed as dist

    from megatron_dsv3 import hf
    from megatron_dsv3.parallel.world import init_model_parallel

    init_model_parallel(tp=2)
    ref = torch.load(ref_path)
    model = hf.load(ckpt)
    assert model.config.sequence_parallel
    main, mtp = masked_logits(model, ref["ids"], ref["mask"])
    report = {"logits": (main - ref["logits"]).abs().max().item(),
              "mtp": max((mtp[r, s:s + n - 1] - ref["mtp"][r, s:s + n - 1]).abs().max().item()
                         for r in range(len(DOCS)) for s, n in documents(r))}
    labels = torch.roll(ref["ids"], -1, dims=1)
    drop = dict(attention_dropout=0.1, hidden_dropout=0.1)
    base = train_step(hf.load(ckpt, **drop), ref["ids"], labels, ref["mask"])
    everything = RECOMPUTE_SETS[-1]
    got = train_step(hf.load(ckpt, **drop, recompute_granularity="selective", recompute_modules=everything),
                     ref["ids"], labels, ref["mask"])
    report["recompute_loss_equal"] = bool(torch.equal(base[0], got[0]))
    report["recompute_grad_rel"] = worst_rel(got[1], base[1])
    report["recompute_grads_equal"] = grads_match(everything, got[1], base[1])
    report["recompute_counts_equal"] = same(base[2], got[2])
    report["dropout_changes_loss"] = not torch.equal(base[0], train_step(hf.load(ckpt), ref["ids"], labels,
                                                                           ref["mask"])[0])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f, indent=1)
