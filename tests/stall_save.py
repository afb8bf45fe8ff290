"""The launcher, with the checkpoint save of one iteration stalled after its shards are written
(before Megatron finishes the save and updates latest_checkpointed_iteration.txt), for the
kill-during-save test:  torchrun tests/stall_save.py ITERATION <launcher args>"""
import sys
import time

from megatron_dsv3.training import launcher as pretrain
from megatron_dsv3.compat.patches import apply, typing_override

apply([typing_override.PATCH])
from megatron.core import dist_checkpointing  # noqa: E402

original = dist_checkpointing.save
stall_at = None


def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
    result = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
    if stall_at in str(checkpoint_dir):
        print("DSV3_TEST: save stalled", flush=True)
        time.sleep(3600)
    return result


if __name__ == "__main__":   # dist_checkpointing starts a spawn-context Manager, which re-imports us
    stall_at = f"iter_{int(sys.argv.pop(1)):07d}"
    dist_checkpointing.save = save
    pretrain.main()
