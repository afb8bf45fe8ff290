"""``python -m megatron_dsv3.pretrain`` / ``dsv3-pretrain``: the launcher (:mod:`megatron_dsv3.training.launcher`)."""
from .training.launcher import main

if __name__ == "__main__":
    main()
