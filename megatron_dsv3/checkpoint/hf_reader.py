"""Reading HF safetensors checkpoints (single file or sharded, FP8 with 128x128 block scales) into a
megatron-dsv3 model: each rank reads only the tensors (and experts) it holds, one at a time."""
from __future__ import annotations

import json
import os
import warnings

import torch

from .hf_keys import (
    FP8_BLOCK,
    IGNORED_HF_KEYS,
    MTP_SHARED_COPIES,
    HFCheckpointError,
    Layout,
    expected_hf_keys,
    local_entries,
    shard,
    tensor_table,
)


class NonFiniteWeightWarning(UserWarning):
    """A checkpoint tensor holds NaN or Inf (loaded as it is: HF users load what they have)."""


INDEX_FILE = "model.safetensors.index.json"


class HFCheckpoint:
    """Lazy reader of a HF safetensors directory (single file or sharded with an index). Errors name
    the file: an unreadable index or shard (truncated, not safetensors), a shard the index names for
    a tensor it does not hold."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self._safe_open = safe_open
        self._open = {}
        self._warned = set()
        index = os.path.join(path, INDEX_FILE)
        self.index = index if os.path.exists(index) else None
        if self.index:
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is a JSON {type(weight_map).__name__}")
            except (ValueError, KeyError, TypeError) as e:
                raise HFCheckpointError(f"{index} is not a safetensors index (a JSON object with a "
                                        f"'weight_map'): {type(e).__name__}: {e}") from None
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise HFCheckpointError(f"{path}: no *.safetensors files")
            weight_map = {}
            for fname in files:
                weight_map.update({k: fname for k in self._shard(fname).keys()})
        self.weight_map = weight_map

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def _shard(self, fname: str, wanted: str = ""):
        """The open safetensors file ``fname``; with an index, checked to hold every tensor the index
        assigns to it."""
        if fname in self._open:
            return self._open[fname]
        full = os.path.join(self.path, fname)
        holding = f" (holding {wanted!r})" if wanted else ""
        if not os.path.exists(full):
            raise HFCheckpointError(f"{self.path}: shard {fname}{holding} does not exist")
        try:
            handle = self._safe_open(full, framework="pt")
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise HFCheckpointError(f"{full}: not a readable safetensors file ({e}); it may be truncated "
                                    "or damaged: copy or download it again") from None
        if self.index:
            held = set(handle.keys())
            wrong = sorted(k for k, f in self.weight_map.items() if f == fname and k not in held)
            if wrong:
                raise HFCheckpointError(f"{self.index} maps {len(wrong)} tensor(s) to {fname}, which does not "
                                        f"hold them, first: {wrong[0]!r}; the index does not match the shards")
        self._open[fname] = handle
        return handle

    def _raw(self, name: str) -> torch.Tensor:
        fname = self.weight_map.get(name)
        if fname is None:
            raise HFCheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        try:
            return self._shard(fname, name).get_tensor(name)
        except HFCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise HFCheckpointError(f"{os.path.join(self.path, fname)}: cannot read tensor {name!r} ({e}); "
                                    "the file may be damaged") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor in fp32; FP8 weights are dequantised with their 128x128 weight_scale_inv. NaN or
        Inf values are loaded as they are, with a NonFiniteWeightWarning naming the tensor."""
        t = self._raw(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name[: -len("weight")] + "weight_scale_inv"
            if scale_name not in self.weight_map:
                raise HFCheckpointError(f"FP8 tensor {name!r} has no {scale_name!r}")
            t = dequantize_fp8(t, self._raw(scale_name), name)
        t = t.float()
        if name not in self._warned and not bool(torch.isfinite(t).all()):
            self._warned.add(name)
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            warnings.warn(f"{self.path}: tensor {name!r} holds {nan} NaN and {inf} Inf of {t.numel()} values; "
                          "loaded as it is", NonFiniteWeightWarning, stacklevel=2)
        return t


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, name: str = "") -> torch.Tensor:
    """w_fp32 = w_fp8 * scale_inv broadcast over 128x128 blocks."""
    rows, cols = w.shape
    expected = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != expected:
        raise HFCheckpointError(f"{name}: weight_scale_inv shape {tuple(scale_inv.shape)}, expected "
                                f"{expected} for a {rows}x{cols} weight in {FP8_BLOCK}x{FP8_BLOCK} blocks")
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return w.float() * s


def hf_shape(key, local: tuple, lay: Layout) -> tuple:
    """The full HF shape of each tensor of ``key`` whose shard on this rank has shape ``local`` (the
    inverse of :func:`shard`: glu pieces are [gate_r; up_r], each HF tensor is checked on its own)."""
    tp = lay.etp if key.shard.startswith("expert") else lay.tp
    kind = key.shard.removeprefix("expert_")
    if kind == "rep":
        return local
    if kind == "col":
        return (local[0] * tp, *local[1:])
    if kind == "row":
        return (local[0], local[1] * tp, *local[2:])
    if kind == "glu":
        return (local[0] // 2 * tp, *local[1:])
    raise AssertionError(kind)


def _check_hf_shape(name: str, got: tuple, want: tuple, ours: str) -> None:
    if got == want:
        return
    hint = "check config.json"
    if len(got) == 2 and got == want[::-1]:
        hint = ("it is stored transposed: HF linear weights are [out_features, in_features]; save it as "
                "weight.T")
    raise HFCheckpointError(f"{name}: shape {got}, but config.json makes it {want} (it loads into our {ours}); "
                            f"{hint}")


def load_into(model, hf_dir: str) -> None:
    """Copy a HF checkpoint into ``model`` (this rank's shard), checking keys and shapes."""
    cfg = model.config
    ckpt = HFCheckpoint(hf_dir)
    present = {k for k in ckpt.keys() if not k.endswith("weight_scale_inv") and not IGNORED_HF_KEYS.match(k)}
    expected = expected_hf_keys(cfg)
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise HFCheckpointError(f"{hf_dir}: {len(missing)} tensor(s) missing, first: {missing[0]!r}")
    if unexpected:
        raise HFCheckpointError(f"{hf_dir}: {len(unexpected)} tensor(s) not in a {cfg.num_layers}-layer "
                                f"model with this config.json, first: {unexpected[0]!r}")
    lay = Layout.of(model)
    table = tensor_table(model)
    loaded = set()
    for key, hf_names, ours, _ in local_entries(model, lay):
        target = table.get(ours)
        if target is None:
            raise HFCheckpointError(f"our model has no tensor {ours!r} (for HF {hf_names[0]!r})")
        tensors = [ckpt.get(n) for n in hf_names]
        for name, t in zip(hf_names, tensors):     # each one (gate_proj and up_proj apart) before sharding
            _check_hf_shape(name, tuple(t.shape), hf_shape(key, tuple(target.shape), lay), ours)
        piece = shard(key, tensors, lay, hf_names[0])
        if tuple(piece.shape) != tuple(target.shape):
            raise HFCheckpointError(f"{hf_names[0]}: shape {tuple(piece.shape)} on this rank does not match "
                                    f"the model's {ours} {tuple(target.shape)}; check config.json")
        with torch.no_grad():
            target.copy_(piece.to(target.dtype))
        loaded.add(ours)
    missed = sorted(n for n, p in model.named_parameters() if n not in loaded)
    if missed:
        raise HFCheckpointError(f"parameters not covered by the HF table: {missed[:3]}")
    for d in range(cfg.mtp_num_layers or 0):
        prefix = f"model.layers.{cfg.num_layers + d}."
        for copy, main in MTP_SHARED_COPIES.items():
            a, b = ckpt.get(copy.format(h=prefix)), ckpt.get(main)
            if a.shape != b.shape or not torch.allclose(a, b, rtol=0, atol=0, equal_nan=True):
                raise HFCheckpointError(f"{copy.format(h=prefix)} differs from {main}: megatron-dsv3 shares "
                                        f"the embedding and head between the model and its MTP modules")


