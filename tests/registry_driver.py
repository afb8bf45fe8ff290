"""The launcher with a schedule and a dispatcher registered from outside megatron_dsv3 (as the
DualPipe and node-limited dispatcher work will do), each counting its calls and otherwise
delegating to Megatron-Core's own:  torchrun tests/registry_driver.py <launcher args>"""
import sys

from megatron_dsv3 import registry
from megatron_dsv3.training import launcher as pretrain
from megatron_dsv3.compat.patches import apply, typing_override

apply([typing_override.PATCH])
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher  # noqa: E402

CALLS = {"schedule": 0, "dispatch": 0}


@registry.register(registry.SCHEDULES, "counting-1f1b")
def counting_schedule(*args, **kwargs):
    inner = get_forward_backward_func(*args, **kwargs)

    def forward_backward(**kw):
        CALLS["schedule"] += 1
        return inner(**kw)

    return forward_backward


@registry.register(registry.DISPATCHERS, "counting-alltoall")
class CountingDispatcher(MoEAlltoAllTokenDispatcher):
    def token_dispatch(self, *args, **kwargs):
        CALLS["dispatch"] += 1
        return super().token_dispatch(*args, **kwargs)


if __name__ == "__main__":
    pretrain.main(sys.argv[1:])
    print(f"DSV3_TEST_CALLS schedule={CALLS['schedule']} dispatch={CALLS['dispatch']}", flush=True)
