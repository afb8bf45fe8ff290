"""dsv3-convert from a source checkout: HF DeepSeek-V3 <-> Megatron torch_dist, streamed.

    .venv/bin/python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR [--dtype bf16|fp32]
                                                 [--max-memory SIZE] [--dry-run]
    .venv/bin/python tools/convert_checkpoint.py mcore-to-hf --mcore DIR --out DIR [--fp8] [--dtype ...]
                                                 [--max-memory SIZE] [--shard-size SIZE] [--hf-config FILE]

(The installed console script ``dsv3-convert`` is the same program: megatron_dsv3/checkpoint/convert.py.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dsv3.checkpoint.convert import cli  # noqa: E402

if __name__ == "__main__":
    cli()
