"""DeepSeekMoE layer: Megatron-Core's ``MoELayer`` (token dispatcher, experts, shared experts) with our
router, and the token dispatcher chosen through :mod:`megatron_dsv3.registry`.

Megatron-Core picks its dispatcher by an if/elif on ``config.moe_token_dispatcher_type``; a class
registered in ``registry.DISPATCHERS`` replaces the one Megatron builds (Megatron's own names pass
through unchanged).
"""
from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection

from ..registry import dispatcher_class


class DSv3MoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        name = config.moe_token_dispatcher_type
        cls = dispatcher_class(name)
        if cls is None:
            super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
            return
        config.moe_token_dispatcher_type = "alltoall"  # Megatron only builds the names it knows
        try:
            super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        finally:
            config.moe_token_dispatcher_type = name
        self.token_dispatcher = cls(self.num_local_experts, self.local_expert_indices, config=config,
                                    pg_collection=pg_collection or get_default_pg_collection())
