"""Megatron-Core's local parallel linears with a plain path when there is nothing parallel to do.

At tensor-parallel size 1, without sequence parallelism, gradient-accumulation fusion, deferred
embedding weight gradients or CPU offloading, Megatron-Core's ``ColumnParallelLinear`` /
``RowParallelLinear`` still run their Python autograd function
(``LinearWithGradAccumulationAndAsyncCommunication``), whose forward and backward compute exactly
``F.linear`` and its two gradient matmuls. These subclasses call :func:`megatron_dsv3.model.gemm.linear`
there (``F.linear`` - torch's C++ autograd, about 35 us less per forward+backward of a [512, 64] x
[64, 96] linear on one CPU thread - or, for large fp32 products on CPU, oneDNN: see gemm.py) and
Megatron-Core's own forward everywhere else; parameters, their attributes,
sharding and checkpoint keys are Megatron-Core's. A layer whose ``_forward_impl`` was replaced on
the instance (the DualPipe weight-gradient split, ``parallel/schedules/wgrad.py``) keeps it.
"""
from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from .gemm import linear


def _plain(layer) -> bool:
    c = layer.config
    return (layer.tp_group.size() == 1 and not layer.sequence_parallel and not layer.gradient_accumulation_fusion
            and not c.defer_embedding_wgrad_compute and c._cpu_offloading_context is None
            and "_forward_impl" not in layer.__dict__ and layer.weight is not None)


class LocalColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear``; a plain linear when nothing is parallel (see the module doc)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None or not _plain(self):
            return super().forward(input_, weight, runtime_gather_output)
        if self.skip_bias_add:
            return linear(input_, self.weight), self.bias
        return linear(input_, self.weight, self.bias), None


class LocalRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear``; a plain linear when nothing is parallel (see the module doc)."""

    def forward(self, input_):
        if not _plain(self):
            return super().forward(input_)
        out = linear(input_, self.weight)
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None
