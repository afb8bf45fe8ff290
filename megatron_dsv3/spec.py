"""``--spec megatron_dsv3.spec get_dsv3_decoder_block_spec`` (Megatron-LM) and ``build_model``: the
layer specs live in :mod:`megatron_dsv3.model.spec`."""
from .model.spec import (  # noqa: F401
    build_model,
    get_dsv3_decoder_block_spec,
    get_dsv3_layer_spec,
    get_dsv3_mtp_block_spec,
)
