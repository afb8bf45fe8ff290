"""Split backwards for the local (CPU / any-device) linear layers: the input gradient now (Bi), the weight
gradient later (W), so that weight grads fill pipeline bubbles (DualPipe's step 6-8, ZB1P).

    y = x W^T (+ b)      Bi: dx = dy W                    (needed by the previous stage now)
                         W:  dW += dy^T x, db += sum dy   (only this rank needs it, any time before the
                                                           optimizer step)

:data:`STORE` is the process's weight-gradient store. Inside ``STORE.split(key)`` (the runtime wraps an
input-grad-only backward in it) every linear made splittable by :func:`enable` computes dx, keeps
(dy, x) and queues its dW / db; ``STORE.run()`` later runs the oldest queued backward's weight grads
(first in, first out, as the order's W operations are). Outside ``split`` the layers compute both at
once, with the same arithmetic as Megatron-Core's own local linear.

:func:`enable` makes Megatron-Core's ``ColumnParallelLinear`` / ``RowParallelLinear`` (attention
projections, dense and expert MLPs, shared experts, the output head) splittable by replacing their
``_forward_impl`` on the instance; tensor parallelism (sequence-parallel all-gather / reduce-scatter,
input-grad all-reduce) is handled as Megatron-Core does. Any other layer (e.g. our replicated
``DuplicatedLinear``) can use :func:`split_linear`. Layers this does not cover compute their weight
grads inside Bi (norm weights, the router, embeddings; Transformer Engine layers, whose
``delay_wgrad_compute`` path is not wired in yet).
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from functools import partial
from typing import Callable, Optional

import torch

from ..collectives import gather_first_dim, reduce_scatter_first_dim


class WeightGradStore:
    """FIFO of deferred weight gradients, one entry per input-grad-only backward."""

    def __init__(self):
        self._open: Optional[list] = None
        self.queue: deque = deque()      # (key, [(fn, held tensors)])

    @contextmanager
    def split(self, key):
        """Run an input-grad-only backward: the weight grads of splittable layers are queued as ``key``."""
        if self._open is not None:
            raise RuntimeError("WeightGradStore.split: a split backward is already open")
        self._open = []
        try:
            yield
        finally:
            entry, self._open = self._open, None
        self.queue.append((key, entry))

    def defer(self, fn: Callable[[], None], held: tuple) -> bool:
        """Queue ``fn`` (keeping ``held`` alive) when a split backward is open; False otherwise."""
        if self._open is None:
            return False
        self._open.append((fn, held))
        return True

    def run(self):
        """Run the oldest queued backward's weight grads; returns its key."""
        key, entry = self.queue.popleft()
        with torch.no_grad():
            for fn, _ in entry:
                fn()
        return key

    def held_bytes(self) -> int:
        """Bytes of the tensors the queued weight grads keep alive."""
        seen, total = set(), 0
        for _, entry in self.queue:
            for _, held in entry:
                for t in held:
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in seen:
                        seen.add(ptr)
                        total += t.untyped_storage().nbytes()
        return total

    def __len__(self) -> int:
        return len(self.queue)


STORE = WeightGradStore()


def _accumulate(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Add a weight grad the way Megatron's DDP would have: into ``main_grad`` when the parameter has one."""
    main = getattr(param, "main_grad", None)
    if main is not None:
        main.add_(grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class SplitLinear(torch.autograd.Function):
    """y = gather(x) W^T + b whose weight grad can be deferred into :data:`STORE`.

    ``sequence_parallel``: x is this rank's sequence shard, gathered over ``tp_group`` before the
    matmul (dx reduce-scattered back); ``allreduce_dgrad``: dx is summed over ``tp_group``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sequence_parallel: bool, allreduce_dgrad: bool, tp_group):
        ctx.save_for_backward(x)
        # the parameter objects themselves (a saved tensor comes back as another Python object,
        # without the main_grad attribute Megatron's DDP puts on the parameter)
        ctx.weight, ctx.bias = weight, bias
        ctx.has_bias = bias is not None
        ctx.sequence_parallel, ctx.allreduce_dgrad, ctx.tp_group = sequence_parallel, allreduce_dgrad, tp_group
        total = gather_first_dim(x, tp_group) if sequence_parallel else x
        y = torch.matmul(total, weight.t())
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, dy):
        (x,), weight = ctx.saved_tensors, ctx.weight
        total = gather_first_dim(x, ctx.tp_group) if ctx.sequence_parallel else x
        dx = dy.matmul(weight)
        if ctx.sequence_parallel:
            dx = reduce_scatter_first_dim(dx, ctx.tp_group)
        elif ctx.allreduce_dgrad:
            torch.distributed.all_reduce(dx, group=ctx.tp_group)
        dy2 = dy.detach().reshape(-1, dy.shape[-1])
        x2 = total.detach().reshape(-1, total.shape[-1])
        bias = ctx.bias

        def weight_grads():
            _accumulate(weight, dy2.t().matmul(x2))
            if bias is not None:
                _accumulate(bias, dy2.sum(dim=0))

        if weight.requires_grad and STORE.defer(weight_grads, (dy2, x2)):
            return dx, None, None, None, None, None
        dw = dy2.t().matmul(x2) if weight.requires_grad else None
        db = dy2.sum(dim=0) if ctx.has_bias and bias.requires_grad else None
        return dx, dw, db, None, None, None


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A plain (replicated) linear whose weight grad :data:`STORE` can defer."""
    return SplitLinear.apply(x, weight, bias, False, False, None)


def _forward_impl(layer, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                  sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                  gtp_remat_size=1, **rest):
    """Replacement of a Megatron parallel linear's ``_forward_impl``. Cases Megatron handles with fused
    or buffered weight grads (gradient-accumulation fusion, deferred embedding wgrad, GTP, frozen
    weights) stay on Megatron's own implementation."""
    if (not weight.requires_grad or gradient_accumulation_fusion or grad_output_buffer is not None
            or (gtp_remat_size or 1) > 1 or rest):
        return type(layer)._forward_impl(
            layer, input=input, weight=weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
            allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
            grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit,
            tp_group=tp_group, gtp_remat_size=gtp_remat_size, **rest)
    sp = bool(sequence_parallel) and tp_group is not None and tp_group.size() > 1
    ar = bool(allreduce_dgrad) and tp_group is not None and tp_group.size() > 1
    return SplitLinear.apply(input, weight, bias, sp, ar, tp_group)


def enable(module: torch.nn.Module, replicated: tuple = ()) -> int:
    """Make the linears under ``module`` splittable; ``replicated``: further layer classes whose
    ``forward(x)`` is ``(x @ weight^T, None)`` (e.g. our DuplicatedLinear). Returns how many."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    count = 0
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            m._forward_impl = partial(_forward_impl, m)
            count += 1
        elif replicated and isinstance(m, replicated):
            m.forward = partial(_replicated_forward, m)
            count += 1
    return count


def _replicated_forward(layer, x):
    return split_linear(x, layer.weight), None
