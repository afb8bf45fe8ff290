"""DeepSeekMoE layer: Megatron-Core's ``MoELayer`` (token dispatcher, experts, shared experts) with our
router, and the token dispatcher chosen through :mod:`megatron_dsv3.registry`.

Megatron-Core builds the dispatcher named by ``config.moe_token_dispatcher_type`` (its own if/elif).
A dispatcher registered as a class (``config.token_dispatcher``, e.g. ``node_limited``) replaces the
one Megatron built; the config carries, as ``moe_token_dispatcher_type``, the Megatron dispatcher whose
behaviour the class provides, so every Megatron code path that tests that name treats ours alike.
"""
from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection

from ..registry import registered_dispatcher


class DSv3MoELayer(MoELayer):
    """``topology``: the node topology (:class:`~megatron_dsv3.parallel.topology.NodeTopology`) bound in
    the layer spec by :func:`~megatron_dsv3.model.spec.build_model`, passed to dispatcher classes that
    declare ``needs_topology``."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, topology=None,
                 **kwargs):
        name = getattr(config, "token_dispatcher", None)
        cls = registered_dispatcher(name) if name else None
        if getattr(config, "moe_dispatch_fp8", False) and not getattr(cls, "supports_fp8_dispatch", False):
            raise ValueError(f"moe_dispatch_fp8=True: the {name or config.moe_token_dispatcher_type!r} token "
                             "dispatcher has no FP8 dispatch (use node_limited)")
        super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        if cls is None:
            return
        extra = {}
        if getattr(cls, "needs_topology", False):
            if topology is None:
                raise ValueError(f"the {name!r} token dispatcher needs a NodeTopology: build the model with "
                                 "megatron_dsv3.spec.build_model (config.ranks_per_node set) or bind "
                                 "topology= in the layer spec")
            extra["topology"] = topology
        self.token_dispatcher = cls(self.num_local_experts, self.local_expert_indices, config=config,
                                    pg_collection=pg_collection or get_default_pg_collection(), **extra)
        if self.use_shared_expert and self.shared_expert_overlap:
            # MoELayer handed the overlapped shared experts to the dispatcher it built.
            self.token_dispatcher.set_shared_experts(self.shared_experts)
