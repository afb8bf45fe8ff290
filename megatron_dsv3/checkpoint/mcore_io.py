"""Megatron-Core distributed checkpoints (``torch_dist``) written and read by one process, a tensor
(or a piece of one) at a time, without torch.distributed.

The format, as Megatron-Core 0.19.2 writes it through torch.distributed.checkpoint (DCP):

- ``__R_I.distcp`` files: records laid end to end, each the ``torch.save`` of one chunk (a box of a
  global tensor, with the box's shape) or the ``torch.save([obj])`` bytes of a ShardedObject;
- ``.metadata``: the pickled ``torch.distributed.checkpoint.metadata.Metadata``: per key the global
  shape, dtype and chunk boxes (``state_dict_metadata``), and per chunk the file, byte offset and
  length (``storage_data``);
- ``metadata.json``: ``{"sharded_backend": "torch_dist", "sharded_backend_version": 1}``;
- the common (non-tensor) state is the ShardedObject ``common_state`` (``torch.save([dict])``).

DCP loads any box of a tensor from any chunk layout (it reads the chunks that overlap the box), so a
checkpoint written here with its own chunking loads into every parallel layout Megatron builds.
"""
from __future__ import annotations

import io
import os
import pickle
import sys
from dataclasses import dataclass

import torch

from .hf_keys import HFCheckpointError

COMMON_STATE = "common_state/shard_0_1"     # ShardedObject("common_state", None, (1,), (0,)).unique_key
METADATA_FILE = ".metadata"
BACKEND_FILE = "metadata.json"
BACKEND_JSON = '{"sharded_backend": "torch_dist", "sharded_backend_version": 1}'
#: the key prefixes of model tensors in a Megatron checkpoint (the rest: optimizer, RNG, common state)
MODEL_PREFIXES = ("embedding.", "decoder.", "mtp.", "output_layer.")


def is_model_key(key: str) -> bool:
    return key.startswith(MODEL_PREFIXES) and "._extra_state" not in key


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def save_tensor(f, tensor: torch.Tensor) -> None:
    """``torch.save`` of a tensor that owns exactly its bytes (a view would save its whole storage)."""
    t = tensor.contiguous()
    if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    torch.save(t, f)


def object_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save([obj], buf)
    return buf.getvalue()


@dataclass(frozen=True)
class Record:
    """One record of a .distcp file: a tensor chunk (offsets/sizes) or an object (offsets None)."""

    key: str
    offsets: tuple | None
    sizes: tuple | None
    file: str
    pos: int
    length: int

    def to_json(self) -> list:
        return [self.key, None if self.offsets is None else list(self.offsets),
                None if self.sizes is None else list(self.sizes), self.file, self.pos, self.length]

    @classmethod
    def from_json(cls, x) -> "Record":
        key, off, sz, file, pos, length = x
        return cls(key, None if off is None else tuple(off), None if sz is None else tuple(sz), file, pos, length)


def build_metadata(tensors: dict[str, tuple[torch.dtype, tuple]], records: list[Record]):
    """DCP ``Metadata`` for tensors {key: (dtype, global shape)} and the records written, in a fixed
    order (tensors as given, chunks and objects in record order): the same bytes on every run."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    # Equal strings as one object (pickle writes a repeated object once): the bytes then depend only
    # on the values, not on where they came from (a fresh run or a resumed run's journal).
    intern = sys.intern
    tensors = {intern(k): v for k, v in tensors.items()}
    chunks: dict[str, list] = {k: [] for k in tensors}
    state, storage = {}, {}
    for r in records:
        key, file = intern(r.key), intern(r.file)
        if r.offsets is None:
            state[key] = BytesStorageMetadata()
            storage[MetadataIndex(key)] = _StorageInfo(file, r.pos, r.length)
            continue
        chunks[key].append(ChunkStorageMetadata(offsets=torch.Size(r.offsets), sizes=torch.Size(r.sizes)))
        storage[MetadataIndex(key, torch.Size(r.offsets))] = _StorageInfo(file, r.pos, r.length)
    for key, (dtype, shape) in tensors.items():
        covered = sum(int(torch.Size(c.sizes).numel()) for c in chunks[key])
        if covered != int(torch.Size(shape).numel()):
            raise AssertionError(f"{key}: chunks cover {covered} of {torch.Size(shape).numel()} elements")
        state[key] = TensorStorageMetadata(properties=TensorProperties(dtype=dtype), size=torch.Size(shape),
                                           chunks=chunks[key])
    ordered = {k: state[k] for k in [*tensors, *(k for k in state if k not in tensors)]}
    return Metadata(state_dict_metadata=ordered, planner_data=None, storage_data=storage,
                    storage_meta=StorageMeta(), version="1.0.0")


def metadata_bytes(md) -> bytes:
    return pickle.dumps(md)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
class _FileSlice(io.RawIOBase):
    """A read-only window [start, start + length) of an open file (what torch.load reads a record from)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        if not n:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


class DCPReader:
    """One Megatron torch_dist checkpoint directory (an ``iter_*`` or ``release`` directory)."""

    def __init__(self, path: str):
        self.path = path
        md_file = os.path.join(path, METADATA_FILE)
        if not os.path.isfile(md_file):
            raise HFCheckpointError(f"{path}: no {METADATA_FILE}, so not a torch_dist checkpoint directory "
                                    "(give an iteration directory or the directory holding "
                                    "latest_checkpointed_iteration.txt)")
        try:
            with open(md_file, "rb") as f:
                self.md = pickle.load(f)
        except Exception as e:  # noqa: BLE001
            raise HFCheckpointError(f"{md_file} cannot be read ({type(e).__name__}: {e})") from None
        self._files: dict[str, object] = {}
        self._cache: tuple | None = None      # (storage index, tensor): the last chunk read

    def keys(self) -> list[str]:
        return list(self.md.state_dict_metadata)

    def tensor(self, key: str):
        """The TensorStorageMetadata of ``key`` (None when it is not a tensor of this checkpoint)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        m = self.md.state_dict_metadata.get(key)
        return m if isinstance(m, TensorStorageMetadata) else None

    def largest_chunk_bytes(self, keys) -> tuple[int, str]:
        best = (0, "")
        for key in keys:
            m = self.tensor(key)
            if m is None:
                continue
            size = m.properties.dtype.itemsize
            for c in m.chunks:
                best = max(best, (int(torch.Size(c.sizes).numel()) * size, key))
        return best

    def _file(self, name: str):
        if name not in self._files:
            path = os.path.join(self.path, name)
            if not os.path.exists(path):
                raise HFCheckpointError(f"{self.path}: {name} is missing (named by {METADATA_FILE})")
            self._files[name] = open(path, "rb", buffering=0)
        return self._files[name]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._cache = None

    def _load(self, index, what: str):
        info = self.md.storage_data.get(index)
        if info is None:
            raise HFCheckpointError(f"{self.path}: {what} is listed in {METADATA_FILE} without a storage entry")
        f = self._file(info.relative_path)
        size = os.fstat(f.fileno()).st_size
        if info.offset + info.length > size:
            raise HFCheckpointError(f"{os.path.join(self.path, info.relative_path)} ends at byte {size} but "
                                    f"{what} runs to {info.offset + info.length}: the file is truncated")
        try:
            return torch.load(io.BufferedReader(_FileSlice(f, info.offset, info.length), 1 << 20),
                              map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise HFCheckpointError(f"{os.path.join(self.path, info.relative_path)}: {what} cannot be read "
                                    f"({type(e).__name__}: {e}); the file may be damaged") from None

    def read_object(self, key: str):
        from torch.distributed.checkpoint.metadata import MetadataIndex

        return self._load(MetadataIndex(key), key)[0]

    def common_state(self) -> dict:
        import megatron.core.dist_checkpointing  # noqa: F401  (registers the safe globals of its args)

        if COMMON_STATE not in self.md.state_dict_metadata:
            if os.path.exists(os.path.join(self.path, "common.pt")):
                return torch.load(os.path.join(self.path, "common.pt"), map_location="cpu", weights_only=True)
            return {}
        return self.read_object(COMMON_STATE)

    def read_box(self, key: str, offset: tuple, shape: tuple) -> torch.Tensor:
        """The box [offset, offset + shape) of tensor ``key`` in its stored dtype, from the chunks that
        overlap it (each loaded whole, the last one kept for the next box). Read-only: it may be a
        view of the cached chunk."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        m = self.tensor(key)
        out, need, filled = None, int(torch.Size(shape).numel()), 0
        for c in m.chunks:
            lo = [max(o, co) for o, co in zip(offset, c.offsets)]
            hi = [min(o + s, co + cs) for o, s, co, cs in zip(offset, shape, c.offsets, c.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            index = MetadataIndex(key, torch.Size(c.offsets))
            if self._cache is None or self._cache[0] != index:
                self._cache = None
                chunk = self._load(index, f"chunk {tuple(c.offsets)} of {key}")
                if tuple(chunk.shape) != tuple(c.sizes):
                    raise HFCheckpointError(f"{self.path}: chunk {tuple(c.offsets)} of {key} holds shape "
                                            f"{tuple(chunk.shape)}, {METADATA_FILE} says {tuple(c.sizes)}")
                self._cache = (index, chunk)
            chunk = self._cache[1]
            src = chunk[tuple(slice(a - co, b - co) for a, b, co in zip(lo, hi, c.offsets))]
            if out is None and int(src.numel()) == need:
                return src                   # one chunk holds the whole box: a view, no copy
            if out is None:
                out = torch.empty(shape, dtype=m.properties.dtype)
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))].copy_(src)   # (not "= src": slow)
            filled += int(src.numel())
        if filled != need:
            raise HFCheckpointError(f"{self.path}: the chunks of {key} cover {filled} of the {need} values "
                                    f"of box {offset}+{shape}; the checkpoint is incomplete")
        return out
