"""Streaming safetensors I/O for the converter: read any row range of a tensor with plain file reads
(no memory map, so resident memory stays at what is read), write a shard whose header is known up
front and whose tensors arrive row block by row block, and DeepSeek's 128x128 block FP8.

The safetensors format: 8 bytes little-endian header length, a JSON header ``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to a multiple of
8 bytes, then the tensors' bytes (row-major, little-endian) at their offsets after the header.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from .hf_keys import FP8_BLOCK, HFCheckpointError

INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: FP8 e4m3's largest finite value (DeepSeek scales each 128x128 block so that its max maps here)
E4M3_MAX = 448.0
_MAX_HEADER = 512 << 20


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: file (relative to the checkpoint), dtype, shape, absolute byte range."""

    file: str
    dtype: torch.dtype
    shape: tuple
    begin: int
    end: int

    @property
    def row_bytes(self) -> int:
        return numel(self.shape[1:]) * itemsize(self.dtype)


def read_header(path: str) -> dict[str, Entry]:
    """{name: Entry} of one safetensors file; an error naming the file when it is not one (or is
    truncated: a tensor's bytes run past the end of the file)."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise HFCheckpointError(f"{path}: {size} bytes, not a safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise HFCheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes): not a "
                                    "safetensors file, or truncated")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise HFCheckpointError(f"{path}: the header is not valid JSON ({e}): not a safetensors file") from None
    if not isinstance(header, dict):
        raise HFCheckpointError(f"{path}: the header is not a JSON object")
    out = {}
    start = 8 + n
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (start + int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HFCheckpointError(f"{path}: tensor {key!r} has a malformed header entry {spec!r}") from None
        if end - begin != numel(shape) * itemsize(dtype):
            raise HFCheckpointError(f"{path}: tensor {key!r}: {end - begin} bytes for shape {shape} "
                                    f"{spec['dtype']}; the header is inconsistent")
        if end > size:
            raise HFCheckpointError(f"{path}: tensor {key!r} ends at byte {end} but the file has {size}: the "
                                    "file is truncated; copy or download it again")
        out[key] = Entry(name, dtype, shape, begin, end)
    return out


class HFDir:
    """A HF safetensors directory (single file or sharded with ``model.safetensors.index.json``),
    read tensor by tensor and row range by row range with plain reads."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise HFCheckpointError(f"{path} is not a directory")
        index = os.path.join(path, INDEX_FILE)
        self.entries: dict[str, Entry] = {}
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is a JSON {type(weight_map).__name__}")
            except (ValueError, KeyError, TypeError) as e:
                raise HFCheckpointError(f"{index} is not a safetensors index (a JSON object with a "
                                        f"'weight_map'): {type(e).__name__}: {e}") from None
            files = sorted(set(weight_map.values()))
            headers = {}
            for fname in files:
                full = os.path.join(path, fname)
                if not os.path.exists(full):
                    first = next(k for k, v in weight_map.items() if v == fname)
                    raise HFCheckpointError(f"{path}: shard {fname} (holding {first!r}, per {INDEX_FILE}) "
                                            "does not exist")
                headers[fname] = read_header(full)
            for key, fname in weight_map.items():
                if key not in headers[fname]:
                    raise HFCheckpointError(f"{index} maps {key!r} to {fname}, which does not hold it; the "
                                            "index does not match the shards")
                self.entries[key] = headers[fname][key]
            for fname, header in headers.items():
                unindexed = sorted(k for k in header if weight_map.get(k) != fname)
                if unindexed:
                    raise HFCheckpointError(f"{os.path.join(path, fname)} holds {unindexed[0]!r}, which "
                                            f"{INDEX_FILE} does not list there ({len(unindexed)} such); the "
                                            "index does not match the shards")
            self.files = files
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise HFCheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
            for fname in files:
                for key, entry in read_header(os.path.join(path, fname)).items():
                    if key in self.entries:
                        raise HFCheckpointError(f"{path}: tensor {key!r} is in both {self.entries[key].file} "
                                                f"and {fname}")
                    self.entries[key] = entry
            self.files = files
        self._handles: dict[str, object] = {}

    def identity(self) -> list:
        """(file, size, mtime_ns) of every file read: a resumed conversion checks the source is the same."""
        out = []
        for fname in sorted(set(self.files) | ({INDEX_FILE} if os.path.exists(os.path.join(self.path, INDEX_FILE))
                                               else set()) | {"config.json"}):
            full = os.path.join(self.path, fname)
            if os.path.exists(full):
                st = os.stat(full)
                out.append([fname, st.st_size, st.st_mtime_ns])
        return out

    def _handle(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = open(os.path.join(self.path, fname), "rb", buffering=0)
        return self._handles[fname]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def read(self, name: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows [r0, r1) of tensor ``name`` (dim 0; all of a 0-d tensor) in its stored dtype."""
        e = self.entries[name]
        if not e.shape:
            r0, r1, row = 0, 1, itemsize(e.dtype)
        else:
            r1 = e.shape[0] if r1 is None else r1
            row = e.row_bytes
        n = (r1 - r0) * row
        buf = torch.empty(n, dtype=torch.uint8)
        f = self._handle(e.file)
        f.seek(e.begin + r0 * row)
        view = memoryview(buf.numpy())
        got = 0
        while got < n:
            k = f.readinto(view[got:])
            if not k:
                raise HFCheckpointError(f"{os.path.join(self.path, e.file)}: tensor {name!r} ends early (the "
                                        "file is truncated)")
            got += k
        shape = (r1 - r0, *e.shape[1:]) if e.shape else ()
        return buf.view(e.dtype).reshape(shape)


# ------------------------------------------------------------------------------------------------
# FP8 (DeepSeek's 128x128 blocks)
# ------------------------------------------------------------------------------------------------
def scale_shape(shape) -> tuple:
    rows, cols = shape
    return (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))


def dequantize_rows(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """fp32 ``w * scale_inv`` broadcast over 128x128 blocks, for rows that start at a block boundary
    (``scale_inv`` holds this row range's block rows). Never expands the scales to full size."""
    rows, cols = w.shape
    out = w.float()
    col_scale = scale_inv.float().repeat_interleave(FP8_BLOCK, dim=1)[:, :cols]      # [block rows, cols]
    full = rows // FP8_BLOCK * FP8_BLOCK
    if full:
        out[:full].view(full // FP8_BLOCK, FP8_BLOCK, cols).mul_(col_scale[: full // FP8_BLOCK, None, :])
    if full < rows:
        out[full:].mul_(col_scale[full // FP8_BLOCK])
    return out


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block FP8: per 128x128 block s = max|w| / 448 (fp32), q = e4m3(w / s); returns
    (q, s) with s of shape [ceil(rows/128), ceil(cols/128)]. Rows must start at a block boundary. An
    all-zero block gets s = 1 (q = 0). Dequantising is ``q.float() * s``."""
    rows, cols = w.shape
    rb, cb = scale_shape((rows, cols))
    if rows % FP8_BLOCK or cols % FP8_BLOCK:
        pad = torch.zeros(rb * FP8_BLOCK, cb * FP8_BLOCK, dtype=torch.float32)
        pad[:rows, :cols].copy_(w)
    else:
        pad = w.float().clone() if w.dtype == torch.float32 else w.float()
    blocks = pad.view(rb, FP8_BLOCK, cb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    blocks.div_(s[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    q = pad.to(torch.float8_e4m3fn)
    return (q[:rows, :cols].contiguous() if q.shape != (rows, cols) else q), s


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def header_for(entries: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None) -> tuple[bytes, dict]:
    """(header bytes incl. the 8-byte length, {name: (begin, end) absolute}) for tensors written in
    the given order."""
    spec, offsets, pos = {}, {}, 0
    if metadata is not None:
        spec["__metadata__"] = metadata
    for name, dtype, shape in entries:
        n = numel(shape) * itemsize(dtype)
        spec[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    body = json.dumps(spec, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    head = struct.pack("<Q", len(body)) + body
    absolute = {}
    for name, dtype, shape in entries:
        begin = len(head) + offsets[name]
        absolute[name] = (begin, begin + numel(shape) * itemsize(dtype))
    return head, absolute


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy when it is contiguous)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
