"""Read the history of a W&B offline run (``.wandb`` file) without syncing it anywhere.

    python -m megatron_dsv3.wandb_offline runs/quickstart/wandb     # metric names, points, last value

The file is W&B's record log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB-style
32 KiB blocks of records (crc32c 4 bytes, length 2 bytes little-endian, type 1 byte: full / first /
middle / last), each carrying one ``wandb_internal_pb2.Record`` protobuf. History records hold the
logged scalars (images appear as JSON descriptors).
"""
from __future__ import annotations

import glob
import json
import os
import struct
import sys

_BLOCK = 32768
_HEADER = 7


def _records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:       # zero padding at the end of a block
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def find_run_file(run_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(run_dir, "**", "*.wandb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no .wandb run file under {run_dir}")
    return files[-1]


def read_history(run_dir_or_file: str) -> dict[str, list[tuple[int, object]]]:
    """{metric: [(step, value), ...]} of the newest run under a directory (or of one .wandb file)."""
    from wandb.proto import wandb_internal_pb2

    path = run_dir_or_file if run_dir_or_file.endswith(".wandb") else find_run_file(run_dir_or_file)
    history: dict[str, list] = {}
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # a torn final record of a run still being written
            continue
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        step = items.pop("_step", None)
        for key, value in items.items():
            if not key.startswith("_"):
                history.setdefault(key, []).append((step, value))
    return history


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m megatron_dsv3.wandb_offline RUN_DIR_OR_FILE")
    history = read_history(argv[0])
    width = max((len(k) for k in history), default=10)
    for key in sorted(history):
        step, value = history[key][-1]
        shown = value if not isinstance(value, dict) else f"<{value.get('_type', 'object')}>"
        print(f"{key:<{width}}  {len(history[key]):5d} points  last (step {step}): {shown}")


if __name__ == "__main__":
    main()
