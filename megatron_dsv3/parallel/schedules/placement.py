"""Which stage each model chunk of a rank holds, and what follows from it.

DualPipe (n ranks): rank r holds stage r of the direction entering at rank 0 (chunk 0) and stage n-1-r
of the direction entering at rank n-1 (chunk 1), a COPY of the parameters rank n-1-r holds as its
chunk 0. DualPipeV (n ranks): chunk 0 is stage r, chunk 1 stage 2n-1-r of one V of 2n stages (one
copy). The stages come from :func:`.order.layout`, the same table the order and the simulator use.

Megatron-Core builds a chunk from its pipeline rank and virtual stage. A stage s of a pipe of S
stages is built as Megatron's stage s: pipeline rank ``s mod n``, virtual stage ``s // n`` (with
``virtual_pipeline_model_parallel_size = S / n``; DualPipe: S = n, no virtual stages). Chunk 0 of rank
r is therefore built as itself; DualPipe's chunk 1 as rank n-1-r, DualPipeV's chunk 1 as rank n-1-r,
virtual stage 1 (stage n + n-1-r = 2n-1-r). Megatron's own layer offsets, pre/post-process flags, MTP
placement and checkpoint keys then follow: every chunk carries the global layer numbers of the model,
so a DualPipe / DualPipeV checkpoint is an ordinary one (loads under 1F1B and back).

:func:`build_chunks` builds the chunks under that view; :func:`sum_mirrored_grads` and
:func:`sum_embedding_copies` make the gradients of duplicated parameters whole before the optimizer
step (each copy of a parameter then holds the gradient of every token, so the copies stay equal).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import order, wgrad


@dataclass(frozen=True)
class ChunkPlace:
    """Where one local chunk sits (order.py notation) and the Megatron view it is built with."""

    schedule: str
    chunk: int
    pipe: int
    stage: int
    n_stages: int
    pp_view: int                 # the pipeline rank Megatron builds this chunk as
    vp_stage: Optional[int]
    vp_size: Optional[int]

    @property
    def pre_process(self) -> bool:
        return self.stage == 0

    @property
    def post_process(self) -> bool:
        return self.stage == self.n_stages - 1

    @property
    def is_copy(self) -> bool:
        """DualPipe's second direction: a copy of pipe 0's parameters for this stage."""
        return self.pipe > 0


def places(schedule: str, n: int, rank: int) -> list[ChunkPlace]:
    n_stages = order.stages(schedule, n)
    vp = n_stages // n
    at = order.layout(schedule, n)
    out = []
    for c in range(order.chunks_per_rank(schedule)):
        pipe, s = at(rank, c)
        out.append(ChunkPlace(schedule, c, pipe, s, n_stages, s % n, s // n if vp > 1 else None,
                              vp if vp > 1 else None))
    return out


def neighbour(place: ChunkPlace, n: int, step: int) -> tuple[int, int]:
    """(rank, chunk) of the stage ``step`` (+1 / -1) away in the same pipe."""
    return order.where(place.schedule, n, place.pipe, place.stage + step)


class PipelineView:
    """The pipeline group as a chunk built for another pipeline rank sees it: ``rank()`` is the
    view, everything else the real group's (the chunk's model code only asks rank and size)."""

    def __init__(self, group, rank: int):
        self._group, self._rank = group, rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._group.size()

    def __getattr__(self, name):
        return getattr(self._group, name)


@contextmanager
def stage_view(place: ChunkPlace):
    """Megatron-Core's global pipeline rank and virtual size read as ``place``'s while a chunk is
    built (mtp_on_this_rank, get_mtp_num_layers_to_build and the layer specs read them)."""
    from megatron.core import parallel_state as ps

    saved = (ps._MPU_PIPELINE_MODEL_PARALLEL_RANK, ps.get_virtual_pipeline_model_parallel_world_size())
    ps.set_pipeline_model_parallel_rank(place.pp_view)
    ps.set_virtual_pipeline_model_parallel_world_size(place.vp_size)
    try:
        yield
    finally:
        ps.set_pipeline_model_parallel_rank(saved[0])
        ps.set_virtual_pipeline_model_parallel_world_size(saved[1])


class ChunkList(list):
    """The chunks of one rank, returned to Megatron's get_model as its list of model chunks."""


def build_chunks(schedule: str, build_one: Callable, config, pg_collection,
                 replicated_linears: tuple = ()) -> ChunkList:
    """Build this rank's chunks of ``schedule`` with ``build_one(pre_process=, post_process=,
    vp_stage=, pg_collection=)`` (a GPTModel on ``config``), make DualPipe's copies equal to their
    originals and the MTP embedding copies equal to the embedding, and make the linears splittable
    (``wgrad``). Collective over the pipeline group."""
    pp = pg_collection.pp
    n, rank = pp.size(), pp.rank()
    mine = places(schedule, n, rank)
    config.virtual_pipeline_model_parallel_size = mine[0].vp_size
    if getattr(config, "share_embeddings_and_output_weights", False):
        raise ValueError(f"--pipeline-schedule {schedule}: tied embedding and output weights are not supported")
    chunks = ChunkList()
    for place in mine:
        pg = copy.copy(pg_collection)
        pg.embd = None          # the embedding copies are kept equal here, not by Megatron's embedding group
        pg.pos_embd = None
        if place.pp_view != rank:
            pg.pp = PipelineView(pp, place.pp_view)
        with stage_view(place):
            chunk = build_one(pre_process=place.pre_process, post_process=place.post_process,
                              vp_stage=place.vp_stage, pg_collection=pg)
        chunk.dsv3_place = place
        chunks.append(chunk)
    _copy_from_originals(chunks, mine, pp)
    _copy_embedding(chunks)
    for chunk, place in zip(chunks, mine):
        if place.is_copy:
            _mark_copy(chunk)
        wgrad.enable(chunk, replicated_linears)
    p2p_groups(pp)
    return chunks


# ----------------------------------------------------------------------------------------------
# DualPipe's copies
# ----------------------------------------------------------------------------------------------
def _partner(place: ChunkPlace, n: int) -> int:
    """The rank holding the other copy of this chunk's stage (DualPipe: n-1-r both ways)."""
    other_pipe = 1 - place.pipe
    return order.where(place.schedule, n, other_pipe, place.stage)[0]


def _state(chunk) -> list[torch.Tensor]:
    return [p.data for p in chunk.parameters()] + [b for b in chunk.buffers() if b.is_floating_point()]


def _exchange(send: list[torch.Tensor], recv_like: list[torch.Tensor], peer: int, group) -> list[torch.Tensor]:
    """Send ``send`` to pipeline rank ``peer`` and receive tensors shaped like ``recv_like`` from it."""
    dst = dist.get_global_rank(group, peer)
    head = torch.tensor([len(send), sum(t.numel() for t in send)], dtype=torch.int64)
    other = torch.empty_like(head)
    _swap(head, other, dst, group)
    mine = torch.tensor([len(recv_like), sum(t.numel() for t in recv_like)], dtype=torch.int64)
    if not torch.equal(other, mine):
        raise RuntimeError(f"DualPipe copies differ in structure: pipeline rank {peer} sends "
                           f"{other.tolist()} (tensors, elements), this rank expects {mine.tolist()}")
    out = []
    for dtype in sorted({t.dtype for t in send}, key=str):
        flat = torch.cat([t.reshape(-1) for t in send if t.dtype == dtype])
        like = [t for t in recv_like if t.dtype == dtype]
        got = torch.empty(sum(t.numel() for t in like), dtype=dtype, device=flat.device)
        _swap(flat, got, dst, group)
        out += list(zip(like, got.split([t.numel() for t in like])))
    index = {id(t): g.view_as(t) for t, g in out}
    return [index[id(t)] for t in recv_like]


def _swap(send: torch.Tensor, recv: torch.Tensor, dst: int, group) -> None:
    works = [dist.isend(send, dst=dst, group=group), dist.irecv(recv, src=dst, group=group)]
    for w in works:
        w.wait()


def _copy_from_originals(chunks, mine, pp) -> None:
    """DualPipe: the copy chunk takes the parameters and buffers of its original on the partner rank
    (which takes this rank's original into its copy at the same time)."""
    copies = [c for c, p in zip(chunks, mine) if p.is_copy]
    if not copies:
        return
    (dup,), orig = copies, next(c for c, p in zip(chunks, mine) if not p.is_copy)
    received = _exchange(_state(orig), _state(dup), _partner(dup.dsv3_place, pp.size()), pp)
    with torch.no_grad():
        for dst, src in zip(_state(dup), received):
            dst.copy_(src)


def _copy_embedding(chunks) -> None:
    """The MTP stage's embedding copy = the embedding of the chunk that has it on this rank (both are on
    the same rank in DualPipe and DualPipeV)."""
    pre = [c for c in chunks if c.pre_process]
    copies = [c for c in chunks if getattr(c, "mtp_process", False) and not c.pre_process]
    if not copies:
        return
    if not pre:
        raise RuntimeError("MTP embedding copy without the embedding on the same rank")
    with torch.no_grad():
        for c in copies:
            c.embedding.word_embeddings.weight.copy_(pre[0].embedding.word_embeddings.weight)


def _mark_copy(chunk) -> None:
    """A copy counts once: out of the gradient norm (Megatron's ``shared``) and out of checkpoints
    (no main replica: every shard is saved by the original and loaded by both)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for p in chunk.parameters():
        p.shared = True
    original = chunk.sharded_state_dict

    def sharded_state_dict(*args, **kwargs):
        state = original(*args, **kwargs)
        for leaf in nested_values(state):
            rid = getattr(leaf, "replica_id", None)
            if rid is not None:
                leaf.replica_id = (1, *rid) if isinstance(rid, tuple) else (1, rid)
        return state

    chunk.sharded_state_dict = sharded_state_dict


# ----------------------------------------------------------------------------------------------
# Gradients of duplicated parameters
# ----------------------------------------------------------------------------------------------
def _grad(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def _grads_and_counts(chunk) -> list[torch.Tensor]:
    """The chunk's parameter gradients and routers' token counts, in module order."""
    out = []
    for p in chunk.parameters():
        if p.requires_grad:
            if _grad(p) is None:
                p.grad = torch.zeros_like(p)
            out.append(_grad(p))
    for m in chunk.modules():
        counts = getattr(m, "local_tokens_per_expert", None)
        if isinstance(counts, torch.Tensor):
            out.append(counts)
    return out


def sum_mirrored_grads(chunks, pp) -> None:
    """DualPipe: each stage's gradient (and expert token counts) = its pipe-0 copy's + its pipe-1
    copy's, on both ranks that hold it (the same sum, in the same order, so bitwise equal)."""
    mine = [c.dsv3_place for c in chunks]
    if not any(p.is_copy for p in mine):
        return
    n = pp.size()
    orig = next(c for c, p in zip(chunks, mine) if not p.is_copy)
    dup = next(c for c, p in zip(chunks, mine) if p.is_copy)
    partner = _partner(dup.dsv3_place, n)
    g_orig, g_dup = _grads_and_counts(orig), _grads_and_counts(dup)
    # the partner's original is my copy's stage and vice versa
    their = _exchange(g_orig + g_dup, g_dup + g_orig, partner, pp)
    their_orig, their_dup = their[:len(g_dup)], their[len(g_dup):]
    with torch.no_grad():
        for mine_o, theirs_d in zip(g_orig, their_dup):     # my stage: pipe 0 (mine) + pipe 1 (theirs)
            mine_o.copy_(mine_o + theirs_d)
        for mine_d, theirs_o in zip(g_dup, their_orig):     # their stage: pipe 0 (theirs) + pipe 1 (mine)
            mine_d.copy_(theirs_o + mine_d)


def sum_embedding_copies(chunks) -> None:
    """The embedding's gradient = the embedding's + the MTP embedding copy's, in both (Megatron's
    embedding-group all-reduce for 1F1B; here both copies are on this rank)."""
    pre = [c for c in chunks if c.pre_process]
    copies = [c for c in chunks if getattr(c, "mtp_process", False) and not c.pre_process]
    if not pre or not copies:
        return
    weights = [pre[0].embedding.word_embeddings.weight] + [c.embedding.word_embeddings.weight for c in copies]
    grads = [_grad(w) for w in weights]
    if any(g is None for g in grads):
        return
    with torch.no_grad():
        total = grads[0].clone()
        for g in grads[1:]:
            total += g
        for g in grads:
            g.copy_(total)


# ----------------------------------------------------------------------------------------------
# Point-to-point streams
# ----------------------------------------------------------------------------------------------
_STREAMS: dict = {}


def p2p_groups(pp) -> dict:
    """One duplicate of the pipeline group per (activation | gradient, chunk) stream, so that each
    stream's messages match in order on any backend (NCCL has no tags). Collective over the world the
    first time."""
    key = tuple(dist.get_process_group_ranks(pp))
    if key in _STREAMS:
        return _STREAMS[key]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, key)
    for ranks in sorted(set(everyone)):
        groups = {(kind, c): dist.new_group(list(ranks)) for kind in ("act", "grad") for c in (0, 1)}
        if ranks == key:
            _STREAMS[key] = groups
    return _STREAMS[key]
