"""``megatron_dsv3.cpu_backend``: the CPU backend's public name (the module is
:mod:`megatron_dsv3.compat.cpu_backend`).

    from megatron_dsv3 import cpu_backend
    cpu_backend.enable(training=True)        # then any Megatron-Core training script runs on CPU
    torchrun --nproc-per-node 4 -m megatron_dsv3.cpu_backend my_pretrain_gpt.py <Megatron-LM flags>
"""
from .compat.cpu_backend import (  # noqa: F401
    CPU_SETTINGS,
    ENV_VAR,
    apply_cpu_settings,
    check_fingerprints,
    disable,
    enable,
    is_enabled,
    keep_freed_memory,
    main,
    requested,
)

if __name__ == "__main__":
    main()
