"""Reading HF safetensors checkpoints (single file or sharded, FP8 with 128x128 block scales) into a
megatron-dsv3 model: each rank reads only the tensors (and experts) it holds, one at a time."""
from __future__ import annotations

import json
import os

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


class HFCheckpoint:
    """Lazy reader of a HF safetensors directory (single file or sharded with an index)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise HFCheckpointError(f"{path}: no *.safetensors files")
            weight_map = {}
            for fname in files:
                with safe_open(os.path.join(path, fname), framework="pt") as f:
                    weight_map.update({k: fname for k in f.keys()})
        self.weight_map = weight_map
        self._open = {}
        self._safe_open = safe_open

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def _raw(self, name: str) -> torch.Tensor:
        fname = self.weight_map.get(name)
        if fname is None:
            raise HFCheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        if fname not in self._open:
            full = os.path.join(self.path, fname)
            if not os.path.exists(full):
                raise HFCheckpointError(f"{self.path}: shard {fname} (holding {name!r}) does not exist")
            self._open[fname] = self._safe_open(full, framework="pt")
        return self._open[fname].get_tensor(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor in fp32; FP8 weights are dequantised with their 128x128 weight_scale_inv."""
        t = self._raw(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name[: -len("weight")] + "weight_scale_inv"
            if scale_name not in self.weight_map:
                raise HFCheckpointError(f"FP8 tensor {name!r} has no {scale_name!r}")
            return dequantize_fp8(t, self._raw(scale_name), name)
        return t.float()


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, name: str = "") -> torch.Tensor:
    """w_fp32 = w_fp8 * scale_inv broadcast over 128x128 blocks."""
    rows, cols = w.shape
    expected = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != expected:
        raise HFCheckpointError(f"{name}: weight_scale_inv shape {tuple(scale_inv.shape)}, expected "
                                f"{expected} for a {rows}x{cols} weight in {FP8_BLOCK}x{FP8_BLOCK} blocks")
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return w.float() * s


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
        piece = shard(key, [ckpt.get(n) for n in hf_names], lay, hf_names[0])
        target = table.get(ours)
        if target is None:
            raise HFCheckpointError(f"our model has no tensor {ours!r} (for HF {hf_names[0]!r})")
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
            if not torch.equal(ckpt.get(copy.format(h=prefix)), ckpt.get(main)):
                raise HFCheckpointError(f"{copy.format(h=prefix)} differs from {main}: megatron-dsv3 shares "
                                        f"the embedding and head between the model and its MTP modules")


