"""DualPipe and DualPipeV (DeepSeek-V3 report sec. 3.2.1, Figure 5) inside Megatron-Core's training loop.

    torchrun --nproc-per-node 4 -m megatron_dsv3.pretrain --cpu --dsv3-preset tiny --num-layers 4 \\
        --pipeline-model-parallel-size 4 --pipeline-schedule dualpipe \\
        --micro-batch-size 1 --global-batch-size 8 ...          # DualPipe: PP even, M even, M >= 2 PP
    ... --pipeline-model-parallel-size 2 --pipeline-schedule dualpipev --num-layers 4 ...   # M >= 2 N

``--pipeline-schedule`` resolves here through ``registry.SCHEDULES``; the launcher's
``pipeline_schedule`` patch makes megatron.training's train loop call :meth:`Schedule.forward_backward`
(Megatron's keyword-only forward-backward contract) instead of 1F1B, and the model provider builds this
rank's two chunks through :meth:`Schedule.build_model_chunks` (``placement.py``). Megatron's own forward
step (our provider's), loss function, MTP and MoE auxiliary-loss scaling run unchanged: each F is
Megatron's ``schedules.forward_step`` and each B Megatron's ``schedules.backward_step`` on one chunk.

Per step, each rank executes ``order.ops(schedule, PP, M)[rank]``, operation by operation:

    F{c}:{m}    receive the activation (unless the chunk holds the embedding), forward, send it on
    B / Bi      receive the output grad (unless the chunk holds the loss), backward, send the input
                grad back; Bi inside ``wgrad.STORE.split``: the weight grads of the linears wait
    W           run the oldest waiting weight grads
    F+B         the pair, forward first, one after the other (on CPU; on a GPU Megatron's combined
                1F1B machinery could overlap them: not wired in yet)

Sends are asynchronous (each stream of activations / gradients of a chunk has its own duplicate of the
pipeline group, so messages match in order on any backend), receives block; since the order is
deadlock-free with instantaneous sends (the simulator checks every order), so is this. At the end of
the step the mirrored copies' gradients and expert token counts are summed (DualPipe), the embedding's
with its MTP copy's, then Megatron's ``finalize_model_grads`` runs (data-parallel reduction, sequence-
parallel norms, the expert-bias update), and every micro-batch's loss report goes to the last pipeline
rank, where Megatron's train step reads it.
"""
from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from ...registry import SCHEDULES, register
from . import order, placement, trace
from .order import Op
from .wgrad import STORE


class ScheduleLaunchError(ValueError):
    """A launch the schedule cannot serve; the message starts with the flag to change."""


def _unwrap(chunk):
    while not hasattr(chunk, "dsv3_place") and hasattr(chunk, "module"):
        chunk = chunk.module
    if not hasattr(chunk, "dsv3_place"):
        raise RuntimeError("DualPipe runs the model chunks built by its build_model_chunks "
                           "(megatron_dsv3's model provider does it for --pipeline-schedule dualpipe/dualpipev)")
    return chunk


class _Step:
    """One forward-backward call on one rank."""

    def __init__(self, schedule, chunks, config, m, data_iterator, forward_step_func, forward_only,
                 first_val_step, seq_length, micro_batch_size, decoder_seq_length):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel.schedules import get_tensor_shapes

        self.schedule, self.chunks, self.config, self.m = schedule, chunks, config, m
        self.models = [_unwrap(c) for c in chunks]
        self.places = [c.dsv3_place for c in self.models]
        self.forward_step_func, self.forward_only, self.first_val_step = forward_step_func, forward_only, first_val_step
        self.pp = ps.get_pipeline_model_parallel_group()
        self.n, self.rank = self.pp.size(), self.pp.rank()
        self.streams = placement.p2p_groups(self.pp)
        cp = ps.get_context_parallel_group()
        self.cp_size = cp.size()
        self.shape = get_tensor_shapes(seq_length=seq_length, micro_batch_size=micro_batch_size,
                                       decoder_seq_length=decoder_seq_length, config=config,
                                       tp_group=ps.get_tensor_model_parallel_group(), cp_group=cp)[0]
        self.device = next(self.models[0].parameters()).device
        self.dtype = config.pipeline_dtype or torch.float32
        needs_data = any(p.pre_process or p.post_process for p in self.places)
        if needs_data and data_iterator is None:
            raise RuntimeError(f"pipeline rank {self.rank} holds the embedding or the loss but has no data")
        # the whole step's micro-batches: the two directions (or the V's two ends) read different ones
        self.batches = [next(data_iterator) for _ in range(m)] if needs_data else None
        self.stores = [[] for _ in self.chunks]         # each chunk's loss reports (Megatron's forward_data_store)
        self.saved: dict = {}                            # (c, m) -> (input, output) until the backward
        self.handoff: dict = {}                          # same-rank neighbours (DualPipeV's turn)
        self.sends: list = []
        self.started: set = set()
        self.rec = trace.Recorder(schedule, self.rank, self.n, m)
        self.exclude = [{p.untyped_storage().data_ptr() for p in c.parameters()} for c in self.models]

    # -- communication --------------------------------------------------------------------------
    def _peer(self, c: int, step: int):
        rank, chunk = placement.neighbour(self.places[c], self.n, step)
        if rank != self.rank and chunk != c:
            raise RuntimeError(f"{self.schedule}: chunk {c} talks to chunk {chunk} of another rank")
        return rank, chunk

    def _send(self, kind: str, c: int, mb: int, tensor: torch.Tensor, step: int) -> None:
        rank, chunk = self._peer(c, step)
        if rank == self.rank:
            self.handoff[(kind, chunk, mb)] = tensor.detach().clone()
            return
        buf = tensor.detach().clone()          # the original is pseudo-freed right after the send
        work = dist.isend(buf, dst=dist.get_global_rank(self.pp, rank), group=self.streams[(kind, c)])
        self.sends.append((work, buf))

    def _recv(self, kind: str, c: int, mb: int, step: int) -> torch.Tensor:
        rank, chunk = self._peer(c, step)
        if rank == self.rank:
            return self.handoff.pop((kind, c, mb))
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=dist.get_global_rank(self.pp, rank), group=self.streams[(kind, c)])
        return buf

    def _input(self, op: Op):
        place = self.places[op.chunk]
        if op.kind == "F" and not place.pre_process:
            x = self._recv("act", op.chunk, op.mb, -1)
            return x.requires_grad_(not self.forward_only)
        if op.kind in ("B", "Bi") and not place.post_process:
            return self._recv("grad", op.chunk, op.mb, +1)
        return None

    # -- operations -----------------------------------------------------------------------------
    def _forward(self, op: Op, x) -> Op:
        from megatron.core.pipeline_parallel.schedules import (
            check_first_val_step,
            deallocate_output_tensor,
            forward_step,
        )

        c, place = op.chunk, self.places[op.chunk]
        gm = order.global_micro_batch(self.schedule, self.m, place.pipe, op.mb)
        data = iter([self.batches[gm]]) if (place.pre_process or place.post_process) else None
        first = c not in self.started
        self.started.add(c)
        counting = nullcontext() if self.forward_only else self.rec.saving((c, op.mb), self.exclude[c])
        with counting:
            out, _ = forward_step(
                self.forward_step_func, data, self.chunks[c], self.m, x, self.stores[c], self.config,
                self.cp_size, collect_non_loss_data=False, checkpoint_activations_microbatch=None,
                is_first_microbatch=check_first_val_step(self.first_val_step, self.forward_only, first),
                current_microbatch=gm, vp_stage=place.vp_stage, is_last_stage=place.post_process)
        if not place.post_process:
            self._send("act", c, op.mb, out, +1)
            if not self.forward_only:
                deallocate_output_tensor(out, self.config.deallocate_pipeline_outputs)
        if not self.forward_only:
            self.saved[(c, op.mb)] = (x, out)
        return op

    def _backward(self, op: Op, grad) -> Op:
        from megatron.core.pipeline_parallel.schedules import backward_step

        c, place = op.chunk, self.places[op.chunk]
        x, out = self.saved.pop((c, op.mb))
        with STORE.split((c, op.mb)) if op.kind == "Bi" else nullcontext():
            dx = backward_step(x, out, grad, self.config)
        self.rec.release((c, op.mb))
        if not place.pre_process:
            self._send("grad", c, op.mb, dx, -1)
        return op

    def run(self) -> None:
        for text in order.ops(self.schedule, self.n, self.m)[self.rank]:
            parts = order.parse(text)
            if self.forward_only:
                parts = [p for p in parts if p.kind == "F"]
                if not parts:
                    continue
            asked = self.rec.now()
            inputs = [self._input(p) for p in parts]
            start = self.rec.now()
            self.rec.wait_s += start - asked
            ran = []
            for p, x in zip(parts, inputs):
                if p.kind == "F":
                    ran.append(self._forward(p, x))
                elif p.kind in ("B", "Bi"):
                    ran.append(self._backward(p, x))
                else:
                    ran.append(Op("W", *STORE.run()))
            self.rec.done(order.fmt(ran), start, self.rec.now(), STORE.held_bytes())
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()
        if self.saved or self.handoff or len(STORE):
            raise RuntimeError(f"{self.schedule}: step ended with work left "
                               f"({len(self.saved)} backwards, {len(STORE)} weight grads)")

    def _holders(self) -> set:
        """Pipeline ranks holding a last stage (the loss, MTP)."""
        last_stage = self.places[0].n_stages - 1
        return {order.where(self.schedule, self.n, pipe, last_stage)[0] for pipe in range(order.pipes(self.schedule))}

    def move_mtp_metrics(self) -> None:
        """Megatron logs MTP losses from its tracker on the last pipeline rank only: this step's MTP
        sums from the other rank holding a loss (DualPipe's second direction, DualPipeV's rank 0)
        move there."""
        if not getattr(self.config, "mtp_num_layers", None):
            return
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        tracker, last = MTPLossLoggingHelper.tracker, self.n - 1
        keys = ("loss_values", "correct_values", "total_values")
        size = (len(keys), self.config.mtp_num_layers)
        if self.rank == last:
            for h in sorted(self._holders() - {last}):
                got = torch.zeros(size, device=self.device)
                dist.recv(got, src=dist.get_global_rank(self.pp, h), group=self.pp)
                for k, row in zip(keys, got):
                    if k not in tracker:
                        tracker[k] = torch.zeros_like(row)
                    tracker[k] += row.to(tracker[k].device)
                if tracker.get("avg_group") is None:
                    tracker["avg_group"] = ps.get_data_parallel_group(with_context_parallel=True)
        elif self.rank in self._holders():
            sent = torch.stack([tracker[k].float() if k in tracker else torch.zeros(size[1], device=self.device)
                                for k in keys]).to(self.device)
            dist.send(sent, dst=dist.get_global_rank(self.pp, last), group=self.pp)
            for k in keys:
                if k in tracker:
                    tracker[k].zero_()

    def losses(self) -> list:
        """Every micro-batch's loss report, in micro-batch order, on the last pipeline rank (where
        Megatron's train step reads them); [] elsewhere."""
        mine = []
        for c, place in enumerate(self.places):
            if place.post_process:
                mine += [(order.global_micro_batch(self.schedule, self.m, place.pipe, j), d)
                         for j, d in enumerate(self.stores[c])]
        last, holders = self.n - 1, self._holders()
        if self.rank == last:
            for h in sorted(holders):
                if h != last:
                    got = [None]
                    dist.recv_object_list(got, src=dist.get_global_rank(self.pp, h), group=self.pp)
                    mine += got[0]
            return [d for _, d in sorted(mine, key=lambda x: x[0])]
        if self.rank in holders:
            dist.send_object_list([mine], dst=dist.get_global_rank(self.pp, last), group=self.pp)
        return []


class _Alone:
    """A one-rank 'group' for Megatron's embedding all-reduce (None would make it fall back to the
    global embedding group)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


_ALONE = _Alone()


class Schedule:
    """``--pipeline-schedule dualpipe | dualpipev``: registered in ``registry.SCHEDULES``. Calling it
    is ``get_forward_backward_func``; it also builds the chunks (model provider) and checks launches."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, pp_size=None, vp_size=None, schedule_pg_collection=None):
        return self.forward_backward

    def __repr__(self):
        return f"Schedule({self.name!r})"

    def build_model_chunks(self, build_one, config, pg_collection, replicated_linears: tuple = ()):
        return placement.build_chunks(self.name, build_one, config, pg_collection, replicated_linears)

    def forward_backward(self, *, forward_step_func, data_iterator, model, num_microbatches: int,
                         seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
                         forward_only: bool = False, collect_non_loss_data: bool = False,
                         first_val_step: Optional[bool] = None, adjust_tensor_shapes_fn=None,
                         p2p_communicator=None, pg_collection=None, force_all_reduce: Optional[bool] = False):
        """Megatron-Core's forward-backward contract. Returns the loss reports on the last pipeline rank."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel.schedules import _build_default_pg_collection
        from megatron.core.utils import get_model_config

        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        if isinstance(data_iterator, (list, tuple)):
            data_iterator = data_iterator[0]
        config = get_model_config(chunks[0])
        for what, bad in (("collect_non_loss_data", collect_non_loss_data),
                          ("adjust_tensor_shapes_fn", adjust_tensor_shapes_fn is not None),
                          ("p2p_communicator", p2p_communicator is not None),
                          ("per-token loss", config.calculate_per_token_loss)):
            if bad:
                raise NotImplementedError(f"--pipeline-schedule {self.name}: {what} is not supported")
        n = ps.get_pipeline_model_parallel_world_size()
        try:
            order.validate(self.name, n, num_microbatches)
        except order.OrderError as e:
            raise ValueError(f"--global-batch-size: {e} (micro-batches per step = global batch / "
                             f"(micro-batch size x data-parallel size))") from None
        if config.timers is not None:
            config.timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)
        no_sync = config.no_sync_func
        contexts = [f() for f in (no_sync if isinstance(no_sync, (list, tuple)) else [no_sync]) if f is not None]
        for ctx in contexts:
            ctx.__enter__()
        step = _Step(self.name, chunks, config, num_microbatches, data_iterator, forward_step_func, forward_only,
                     first_val_step, seq_length, micro_batch_size, decoder_seq_length)
        try:
            step.run()
        finally:
            for ctx in reversed(contexts):
                ctx.__exit__(None, None, None)
        if not forward_only:
            placement.sum_mirrored_grads(step.models, step.pp)
            placement.sum_embedding_copies(step.models)
            if config.finalize_model_grads_func is not None:
                pgc = pg_collection if pg_collection is not None else _build_default_pg_collection()
                pgc = copy.copy(pgc)
                pgc.embd = _ALONE        # the embedding copies were summed above
                pgc.pos_embd = None
                config.finalize_model_grads_func(chunks, None, pg_collection=pgc, force_all_reduce=force_all_reduce)
        losses = step.losses()
        step.move_mtp_metrics()
        step.rec.publish(forward_only=forward_only)
        if config.timers is not None:
            config.timers("forward-backward").stop()
        return losses

    def check_launch(self, args, fields: dict) -> None:
        """Refuse, naming the flag, what this schedule cannot run (before any process group exists)."""
        n = args.pipeline_model_parallel_size
        name = self.name
        uneven = (("decoder_first_pipeline_num_layers", "--decoder-first-pipeline-num-layers"),
                  ("decoder_last_pipeline_num_layers", "--decoder-last-pipeline-num-layers"))
        for dest, flag in (("num_layers_per_virtual_pipeline_stage", "--num-layers-per-virtual-pipeline-stage"),
                           ("num_virtual_stages_per_pipeline_rank", "--num-virtual-stages-per-pipeline-rank"),
                           ("virtual_pipeline_model_parallel_size", "--virtual-pipeline-model-parallel-size"),
                           ("pipeline_model_parallel_layout", "--pipeline-model-parallel-layout"),
                           *(uneven if name == "dualpipev" else ())):
            if getattr(args, dest, None) is not None:
                raise ScheduleLaunchError(f"{flag} cannot be used with --pipeline-schedule {name}: it places "
                                          "the stages itself (two per rank); drop it")
        for dest, flag in (("account_for_embedding_in_pipeline_split", "--account-for-embedding-in-pipeline-split"),
                           ("account_for_loss_in_pipeline_split", "--account-for-loss-in-pipeline-split"),
                           ("overlap_grad_reduce", "--overlap-grad-reduce")):
            if getattr(args, dest, False):
                raise ScheduleLaunchError(f"{flag} is not supported with --pipeline-schedule {name}; drop it")
        if getattr(args, "export_hf", None) is not None:
            raise ScheduleLaunchError(f"--export-hf loads the checkpoint without pipelining: use the default "
                                      f"--pipeline-schedule 1f1b (a {name} checkpoint is an ordinary one)")
        if name == "dualpipe" and n % 2:
            raise ScheduleLaunchError(f"--pipeline-model-parallel-size {n}: dualpipe needs an even number of "
                                      "pipeline ranks (stage i and its mirror PP-1-i share a rank)")
        n_stages = order.stages(name, n)
        layers = fields.get("num_layers") or args.num_layers
        first, last = (getattr(args, dest, None) for dest, _ in uneven)
        if layers is not None and (first is not None or last is not None):
            # DualPipe's stage s is Megatron's pipeline stage s: Megatron's uneven first / last stage
            # (e.g. DeepSeek-V3's 61 layers on 16 stages) applies as it is
            middle = layers - (first or 0) - (last or 0)
            inner = n_stages - (first is not None) - (last is not None)
            if middle < 0 or (inner and middle % inner) or (not inner and middle):
                raise ScheduleLaunchError(
                    f"--num-layers {layers} with --decoder-first-pipeline-num-layers {first} / "
                    f"--decoder-last-pipeline-num-layers {last}: the other {inner} stages must share the "
                    f"remaining {middle} layers evenly")
        elif layers is not None and layers % n_stages:
            raise ScheduleLaunchError(f"--num-layers {layers}: {name} on {n} pipeline ranks has {n_stages} stages; "
                                      f"the layers must divide evenly into them (DualPipe also takes "
                                      f"--decoder-first/last-pipeline-num-layers)")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dp = world // max(1, n * args.tensor_model_parallel_size * (args.context_parallel_size or 1))
        mbs, gbs = args.micro_batch_size, args.global_batch_size
        batches = [(f"--global-batch-size {gbs}", gbs)]
        steps = getattr(args, "step_batch_size_schedule", None)
        if steps:                          # every batch size of the schedule must fit the schedule
            batches = [(f"--step-batch-size-schedule {steps!r} (global batch {b})", b)
                       for b in (int(part.split(":")[1]) for part in steps.split())]
        for what, batch in batches:
            if batch is None or not mbs or not dp or batch % (mbs * dp):
                continue                    # Megatron's own check refuses it
            m = batch // (mbs * dp)
            try:
                order.validate(name, n, m)
            except order.OrderError as e:
                raise ScheduleLaunchError(
                    f"{what}: {m} micro-batches per step (--micro-batch-size {mbs}, data-parallel size {dp}); "
                    f"{e}") from None


DUALPIPE = register(SCHEDULES, "dualpipe")(Schedule("dualpipe"))
DUALPIPEV = register(SCHEDULES, "dualpipev")(Schedule("dualpipev"))
