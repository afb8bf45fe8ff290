import pytest

from megatron_dsv3 import registry
from megatron_dsv3.spec import get_dsv3_decoder_block_spec


def test_registry_resolves_and_refuses():
    assert registry.resolve(registry.SPECS, "decoder_block", "spec") is get_dsv3_decoder_block_spec
    table = {}
    registry.register(table, "x")(int)
    with pytest.raises(KeyError, match="already registered"):
        registry.register(table, "x")(float)
    with pytest.raises(KeyError, match=r"unknown dispatcher 'deepep'.*alltoall"):
        registry.resolve(registry.DISPATCHERS, "deepep", "dispatcher")
