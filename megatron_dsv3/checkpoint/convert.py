"""``dsv3-convert``: HF DeepSeek-V3 safetensors <-> Megatron-Core distributed checkpoint (torch_dist),
streamed a piece of a tensor at a time, in one process, without a process group larger than one.

    dsv3-convert hf-to-mcore --hf DIR --out DIR [--dtype bf16|fp32] [--max-memory SIZE] [--dry-run]
    dsv3-convert mcore-to-hf --mcore DIR --out DIR [--fp8] [--dtype bf16|fp32] [--max-memory SIZE]
                             [--shard-size SIZE] [--hf-config FILE] [--dry-run]

**The plan.** Which Megatron tensor (key, global shape) and which box of it each HF tensor is, is read
from Megatron-Core itself: our DeepSeek-V3 model is built on the meta device at world size 1 and its
``sharded_state_dict()`` gives every key, shape, expert axis and the gate/up halves of the SwiGLU
``linear_fc1`` (Megatron's factory); the HF names come from the one key table
(:mod:`megatron_dsv3.checkpoint.hf_keys`). Megatron's keys do not depend on the parallel layout, and
torch_dist reshards on load, so one converted checkpoint loads at any TP / PP / EP / expert-TP.

**hf-to-mcore** writes ``OUT/release/`` (Megatron's directory for a converted checkpoint: loaded as
iteration 0, without optimizer or RNG state) with ``OUT/latest_checkpointed_iteration.txt`` =
``release``, the checkpoint manifest (:mod:`megatron_dsv3.checkpoint.manifest`) and
``OUT/config.json`` (the HF config: ``dsv3-pretrain --dsv3-hf-config OUT --load OUT``). Each HF tensor
becomes chunks of at most 64 MiB (rows), so memory stays at a few chunks whatever the model size.

**mcore-to-hf** reads any torch_dist checkpoint of our model (converted here or saved by the launcher
at any layout) box by box from its ``.metadata`` and writes sharded safetensors + index +
config.json. The model config comes from ``--hf-config``, else from the checkpoint's common state:
the HF config stored by hf-to-mcore, or the launcher's saved arguments (its DSv3 model fields and
padded vocabulary).

Both write into ``OUT.partial`` and rename it at the end (see :mod:`.staging`): an interrupted run,
rerun with the same arguments, continues and writes the same bytes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from .hf_keys import FP8_BLOCK, IGNORED_HF_KEYS, MTP_SHARED_COPIES, HFCheckpointError, all_entries
from .mcore_io import (
    BACKEND_FILE,
    BACKEND_JSON,
    COMMON_STATE,
    METADATA_FILE,
    DCPReader,
    Record,
    build_metadata,
    is_model_key,
    metadata_bytes,
    object_bytes,
    save_tensor,
)
from .safetensors_io import (
    FP8_DTYPES,
    INDEX_FILE,
    HFDir,
    dequantize_rows,
    header_for,
    itemsize,
    numel,
    quantize_rows,
    scale_shape,
    tensor_bytes,
)
from .staging import ConvertError, Staging, write_small

FORMAT_VERSION = 1
RELEASE = "release"
TRACKER = "latest_checkpointed_iteration.txt"
#: Megatron chunk size written by hf-to-mcore (fixed, so the output does not depend on --max-memory)
CHUNK_BYTES = 64 << 20
#: rows of a HF tensor handled per step by mcore-to-hf (fp32 bytes)
PIECE_BYTES = 64 << 20
#: hf-to-mcore starts a new .distcp file after about this many bytes
DISTCP_FILE_BYTES = 2 << 30
DEFAULT_MAX_MEMORY = "4GiB"
DEFAULT_SHARD_SIZE = "5GB"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Megatron's content metadata for model sharded state dicts (as megatron.training writes it)
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
SCALE_SUFFIX = "weight_scale_inv"


# ------------------------------------------------------------------------------------------------
# The plan: HF tensor <-> box of a Megatron tensor, read from Megatron's sharded_state_dict
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One HF tensor and where it lies in the Megatron checkpoint."""

    index: int
    hf: str                      # HF name
    shape: tuple                 # HF shape
    key: str                     # Megatron sharded key
    offset: tuple                # its box in the global Megatron tensor (prepended axes first) ...
    box: tuple                   # ... and the box's extent (the HF shape with 1 for each prepended axis)
    fp8: bool                    # DeepSeek's release stores it in FP8
    copy_of: str | None = None   # an MTP module's copy of the shared embedding / head

    @property
    def lead(self) -> int:
        """Index of the HF tensor's first dimension inside the Megatron box."""
        return len(self.box) - len(self.shape)

    def rows_box(self, r0: int, r1: int) -> tuple[tuple, tuple]:
        """(offset, shape) of HF rows [r0, r1) inside the Megatron tensor."""
        off, box = list(self.offset), list(self.box)
        if self.shape:
            off[self.lead] += r0
            box[self.lead] = r1 - r0
        return tuple(off), tuple(box)


@dataclass
class Plan:
    hf_config: dict
    cfg: object
    items: list[Item]
    tensors: dict[str, tuple]          # Megatron key -> global shape
    fp32_keys: set[str]                # kept fp32 whatever --dtype (the expert bias)
    objects: list[str]                 # Megatron ShardedObjects (layers' extra state, None here)
    hf_to_item: dict[str, Item] = field(default_factory=dict)

    def describe(self) -> str:
        c = self.cfg
        moe = len(c.moe_layer_numbers) if c.has_moe else 0
        return (f"{c.num_layers} layers ({c.num_layers - moe} dense, {moe} MoE), "
                f"{c.n_routed_experts or 0} routed experts, MTP depth {c.mtp_num_layers or 0}, "
                f"vocabulary {c.vocab_size}")


def plan_config(hf_config: dict):
    """Our DSv3Config for a HF config.json, as the plan builds it (CPU layers, no initialisation;
    the training coefficients do not shape the weights, so the paper's stand in when missing)."""
    from ..config import DSv3Config, DSv3ConfigError, cpu_overrides
    from ..config.hf_config import hf_to_config_kwargs

    try:
        kw = hf_to_config_kwargs(dict(hf_config))
        coeff = dict(seq_aux_alpha=kw.get("seq_aux_alpha", 1e-4), bias_update_rate=1e-3, mtp_lambda=0.3)
        return DSv3Config.from_hf_config(dict(hf_config), **coeff, **cpu_overrides(),
                                         perform_initialization=False)
    except (DSv3ConfigError, KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"config.json does not describe a DeepSeek-V3-family model megatron-dsv3 "
                           f"builds: {e}") from None


def build_plan(hf_config: dict) -> Plan:
    """Build the model on the meta device at world size 1 and map every HF tensor to its box."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from ..compat import cpu_backend
    from ..model.spec import build_model
    from ..parallel.world import ensure_world

    cfg = plan_config(hf_config)
    if not cpu_backend.is_enabled():
        cpu_backend.enable(force=True)
    ensure_world()
    sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
             ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
    if sizes != (1, 1, 1, 1):
        raise ConvertError(f"the converter plans at TP=PP=EP=expert-TP=1 but this process has {sizes}; "
                           "run it in its own process")
    with torch.device("meta"):
        model = build_model(cfg)
    metadata = dict(CONTENT_METADATA, dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True))
    sd = model.sharded_state_dict(metadata=metadata)

    items: list[Item] = []
    tensors: dict[str, tuple] = {}
    fp32_keys: set[str] = set()
    used: set[str] = set()

    def add(hf, st, fp8, copy_of=None):
        p = st.prepend_axis_num
        if st.flattened_range is not None:
            raise AssertionError(f"{st.key}: flattened shard in a model state dict")
        items.append(Item(len(items), hf, tuple(st.local_shape), st.key, tuple(st.global_offset),
                          (1,) * p + tuple(st.local_shape), fp8, copy_of))
        tensors.setdefault(st.key, tuple(st.global_shape))

    main_of: dict[str, object] = {}
    for key, hf_names, ours, e, (kind, idx) in all_entries(cfg):
        name = ours.replace("{l}", str(idx)) if kind == "decoder" else ours
        if e is not None:
            name = name.replace("{le}", str(e))
        sh = sd.get(name)
        if sh is None:
            raise AssertionError(f"Megatron's model has no {name!r} (HF {hf_names[0]!r})")
        parts = sh.build() if isinstance(sh, ShardedTensorFactory) else [sh]
        if len(parts) != len(hf_names) or not all(isinstance(p, ShardedTensor) for p in parts):
            raise AssertionError(f"{name}: {len(parts)} Megatron pieces for HF {hf_names}")
        used.add(name)
        for hf, st in zip(hf_names, parts):
            add(hf, st, key.fp8)
            main_of[hf] = st
            if hf.endswith("e_score_correction_bias"):
                fp32_keys.add(st.key)
    for d in range(cfg.mtp_num_layers or 0):
        prefix = f"model.layers.{cfg.num_layers + d}."
        for copy, main in MTP_SHARED_COPIES.items():
            add(copy.format(h=prefix), main_of[main], False, copy_of=main)
    objects, uncovered = [], []
    for name, sh in sd.items():
        if isinstance(sh, ShardedObject):
            objects.append(sh.unique_key)
        elif name not in used:
            uncovered.append(name)
    if uncovered:
        raise AssertionError(f"Megatron tensors the HF key table does not cover: {uncovered[:3]}")
    plan = Plan(dict(hf_config), cfg, items, tensors, fp32_keys, objects)
    plan.hf_to_item = {it.hf: it for it in items}
    del model, sd
    gc.collect()
    return plan


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str, flag: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ConvertError(f"{flag} {text!r}: give a size like 4GiB, 500MB or 2G")
    return int(float(m.group(1)) * _UNITS[unit])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def natural(name: str) -> list:
    """Sort key: numbers in names compare as numbers (layer 2 before layer 10)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rows_per(cols_bytes: int, budget: int) -> int:
    """Rows per piece: a multiple of the FP8 block that keeps the piece within ``budget`` bytes."""
    return max(FP8_BLOCK, budget // max(cols_bytes, 1) // FP8_BLOCK * FP8_BLOCK)


class Progress:
    """tqdm bar of bytes, with the tensors done and the ETA."""

    def __init__(self, total_bytes: int, total_items: int, done_bytes: int, done_items: int, desc: str,
                 enabled: bool):
        from tqdm import tqdm

        self.items, self.total_items = done_items, total_items
        self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                        desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B "
                                   "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self.bar.set_postfix_str(f"tensors {done_items}/{total_items}", refresh=False)

    def update(self, nbytes: int, items: int = 0) -> None:
        self.items += items
        if items:
            self.bar.set_postfix_str(f"tensors {self.items}/{self.total_items}", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


#: float dtype -> (integer view, exponent bits: all set = NaN or Inf)
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000),
             torch.float8_e4m3fn: (torch.int8, 0x7F), torch.float8_e5m2: (torch.int8, 0x7C)}


def has_nonfinite(t: torch.Tensor) -> bool:
    """Any NaN / Inf, from the exponent bits (numpy on the integer view: ~20x faster than
    torch.isfinite on bf16 on CPU), a few MB at a time."""
    import numpy as np

    view, mask = _EXPONENT[t.dtype]
    flat = t.reshape(-1).view(view).numpy()
    step = 4 << 20
    for i in range(0, flat.size, step):
        if int(np.bitwise_and(flat[i:i + step], mask).max(initial=0)) == mask:
            return True
    return False


class NonFinite:
    """Tensors holding NaN / Inf: converted as they are, named at the end."""

    def __init__(self):
        self.names: list[str] = []

    def check(self, name: str, t: torch.Tensor) -> None:
        if t.dtype in _EXPONENT and (not self.names or self.names[-1] != name) and has_nonfinite(t):
            self.names.append(name)

    def report(self) -> None:
        if self.names:
            print(f"dsv3-convert: warning: {len(self.names)} tensor(s) hold NaN or Inf values (converted as they "
                  f"are), first: {self.names[0]!r}", file=sys.stderr)


def _memory_check(max_memory: int, expected: int, what: str) -> None:
    if expected > max_memory:
        raise ConvertError(f"--max-memory {human(max_memory)} is below the expected peak of {human(expected)} "
                           f"({what}); raise --max-memory")


def _report(direction: str, out: str, nbytes: int, seconds: float, max_memory: int, items: int) -> dict:
    peak = peak_rss()
    rate = nbytes / max(seconds, 1e-9)
    print(f"dsv3-convert {direction}: wrote {out}: {items} tensors, {human(nbytes)} in {seconds:.1f} s "
          f"({rate / 1e9:.3f} GB/s); peak RSS {human(peak)} (--max-memory {human(max_memory)})", flush=True)
    if peak > max_memory:
        print(f"dsv3-convert: warning: the peak RSS {human(peak)} exceeded --max-memory {human(max_memory)}",
              file=sys.stderr)
    return {"bytes": nbytes, "seconds": seconds, "gb_per_s": rate / 1e9, "peak_rss": peak, "items": items}


# ------------------------------------------------------------------------------------------------
# hf-to-mcore
# ------------------------------------------------------------------------------------------------
def _read_hf_config(hf_dir: str) -> dict:
    from ..config import DSv3ConfigError
    from ..config.hf_config import read_hf_config

    try:
        return read_hf_config(hf_dir)
    except (OSError, DSv3ConfigError) as e:
        raise ConvertError(f"--hf {hf_dir}: {e}") from None


def check_hf_source(plan: Plan, src: HFDir) -> dict[str, bool]:
    """Every tensor the config implies is there with its shape, nothing else is; FP8 weights have
    their scales. Returns {HF name: stored as FP8}. Errors name the tensor."""
    expected = set(plan.hf_to_item)
    present = set(src.entries)
    scales = {k for k in present if k.endswith(SCALE_SUFFIX)}
    ignored = {k for k in present if IGNORED_HF_KEYS.match(k)}
    missing = [it.hf for it in plan.items if it.hf not in present]         # in model order
    if missing:
        raise ConvertError(f"--hf {src.path}: {len(missing)} tensor(s) that config.json implies are missing, "
                           f"first: {missing[0]!r}")
    extra = sorted(present - expected - scales - ignored, key=natural)
    if extra:
        raise ConvertError(f"--hf {src.path}: {len(extra)} tensor(s) not in the model config.json describes "
                           f"({plan.describe()}), first: {extra[0]!r}")
    fp8 = {}
    for item in plan.items:                                                 # in model order
        name, e = item.hf, src.entries[item.hf]
        if e.shape != item.shape:
            hint = ("it is stored transposed (HF linear weights are [out_features, in_features])"
                    if len(e.shape) == 2 and e.shape == item.shape[::-1] else "check config.json")
            raise ConvertError(f"--hf {src.path}: {name}: shape {e.shape} in {e.file}, but config.json makes it "
                               f"{item.shape} (Megatron {item.key}); {hint}")
        is_fp8 = e.dtype in FP8_DTYPES
        if is_fp8:
            scale = name[: -len("weight")] + SCALE_SUFFIX
            if len(e.shape) != 2:
                raise ConvertError(f"--hf {src.path}: {name} is FP8 but not a matrix")
            if scale not in src.entries:
                raise ConvertError(f"--hf {src.path}: FP8 tensor {name!r} has no {scale!r}")
            if src.entries[scale].shape != scale_shape(e.shape):
                raise ConvertError(f"--hf {src.path}: {scale}: shape {src.entries[scale].shape}, expected "
                                   f"{scale_shape(e.shape)} for a {e.shape[0]}x{e.shape[1]} weight in "
                                   f"{FP8_BLOCK}x{FP8_BLOCK} blocks")
        elif not e.dtype.is_floating_point:
            raise ConvertError(f"--hf {src.path}: {name} is stored as {dtype_name(e.dtype)}, not a float type")
        fp8[name] = is_fp8
    for scale in sorted(scales):
        weight = scale[: -len(SCALE_SUFFIX)] + "weight"
        if not fp8.get(weight):
            raise ConvertError(f"--hf {src.path}: {scale!r} scales no FP8 weight ({weight!r} is "
                               f"{'not in the checkpoint' if weight not in src.entries else 'not FP8'})")
    if ignored:
        print(f"dsv3-convert: {len(ignored)} rotary_emb.inv_freq buffer(s) not converted (recomputed from "
              "config.json)", file=sys.stderr)
    return fp8


def _default_dtype(plan: Plan, src: HFDir) -> torch.dtype:
    """bf16, unless a weight (not the fp32 expert bias) is stored in fp32 / fp16 / fp64: then fp32."""
    for it in plan.items:
        if it.key in plan.fp32_keys:
            continue
        if src.entries[it.hf].dtype in (torch.float32, torch.float16, torch.float64):
            return torch.float32
    return torch.bfloat16


@dataclass
class _Chunk:
    item: Item
    r0: int
    r1: int


def _hf_to_mcore_layout(plan: Plan, out_dtype: torch.dtype):
    """Chunks of every item and the .distcp file each item goes to (fixed by the plan and dtype)."""
    layout, file_index, in_file = [], 0, 0
    for it in plan.items:
        if it.copy_of is not None:
            layout.append((it, None, []))
            continue
        size = itemsize(torch.float32 if it.key in plan.fp32_keys else out_dtype)
        nbytes = numel(it.shape) * size
        if in_file and in_file + nbytes > DISTCP_FILE_BYTES:
            file_index, in_file = file_index + 1, 0
        in_file += nbytes
        if len(it.shape) <= 1:
            chunks = [_Chunk(it, 0, it.shape[0] if it.shape else 0)]
        else:
            rows = _rows_per(numel(it.shape[1:]) * size, CHUNK_BYTES)
            chunks = [_Chunk(it, r, min(r + rows, it.shape[0])) for r in range(0, it.shape[0], rows)]
        layout.append((it, f"{RELEASE}/__0_{file_index}.distcp", chunks))
    return layout, file_index


def _read_rows(src: HFDir, name: str, r0: int, r1: int, fp8: bool) -> torch.Tensor:
    """HF rows [r0, r1) of ``name`` (FP8 dequantised to fp32 with its block scales)."""
    t = src.read(name, r0, r1)
    if fp8:
        scale = src.read(name[: -len("weight")] + SCALE_SUFFIX, r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK))
        t = dequantize_rows(t, scale)
    return t


def hf_to_mcore(hf_dir: str, out: str, dtype: str | None = None, max_memory: str = DEFAULT_MAX_MEMORY,
                dry_run: bool = False, progress: bool = True) -> dict:
    """Convert a HF DeepSeek-V3 checkpoint into a Megatron torch_dist checkpoint at ``out``."""
    budget = parse_size(max_memory, "--max-memory")
    hf_config = _read_hf_config(hf_dir)
    src = HFDir(hf_dir)
    plan = build_plan(hf_config)
    fp8 = check_hf_source(plan, src)
    out_dtype = DTYPES[dtype] if dtype else _default_dtype(plan, src)
    layout, last_file = _hf_to_mcore_layout(plan, out_dtype)
    src_bytes = sum(src.entries[it.hf].end - src.entries[it.hf].begin for it in plan.items)
    src_bytes += sum(src.entries[k].end - src.entries[k].begin for k in src.entries if k.endswith(SCALE_SUFFIX))
    out_bytes = sum(numel(c.item.shape[1:]) * (c.r1 - c.r0) * itemsize(
        torch.float32 if c.item.key in plan.fp32_keys else out_dtype) for _, _, cs in layout for c in cs)
    n_chunks = sum(len(cs) for _, _, cs in layout)
    expected = rss_now() + _hf_to_mcore_working_set(plan, src, fp8, layout, out_dtype) + MARGIN
    files = [f"{RELEASE}/__0_{i}.distcp" for i in range(last_file + 1)]
    if dry_run:
        print(f"dsv3-convert hf-to-mcore plan (nothing written):\n"
              f"  source   {hf_dir}: {len(src.files)} safetensors file(s), {len(plan.items)} tensors "
              f"({sum(fp8.values())} FP8, dequantised), {human(src_bytes)}\n"
              f"  model    {plan.describe()}\n"
              f"  output   {out}/{RELEASE}/: {len(plan.tensors)} Megatron tensors in {n_chunks} chunks, "
              f"{human(out_bytes)} {dtype_name(out_dtype)} (expert bias fp32) in {len(files)} file(s) "
              f"({os.path.basename(files[0])} .. {os.path.basename(files[-1])}), + {METADATA_FILE}, {BACKEND_FILE}, dsv3_manifest.json; "
              f"{out}/{TRACKER} (release), {out}/config.json\n"
              f"  memory   expected peak {human(expected)} (--max-memory {human(budget)})")
        return {"items": len(plan.items), "bytes": out_bytes, "files": files, "expected_peak": expected}
    _memory_check(budget, expected, f"the process now, plus {human(CHUNK_BYTES)} chunks being converted")
    fingerprint = {"direction": "hf-to-mcore", "version": FORMAT_VERSION, "source": os.path.abspath(hf_dir),
                   "source_files": src.identity(), "dtype": dtype_name(out_dtype)}
    stage = Staging(out, fingerprint)
    start = time.perf_counter()
    bar = Progress(src_bytes, len(plan.items), 0, stage.committed, "hf-to-mcore", progress)
    nonfinite = NonFinite()
    try:
        done = stage.committed
        bar.update(sum(src.entries[it.hf].end - src.entries[it.hf].begin for it, _, _ in layout[:done]))
        current = None
        for it, rel, chunks in layout[done:]:
            if it.copy_of is not None:
                _check_copy(src, it, plan.hf_to_item[it.copy_of], fp8)
                stage.item_done({"item": it.index})
                bar.update(src.entries[it.hf].end - src.entries[it.hf].begin, 1)
                continue
            if current is not None and rel != current:
                stage.close_file(current)
            current = rel
            f = stage.file(rel, hashed=True)
            target = torch.float32 if it.key in plan.fp32_keys else out_dtype
            mine = []
            for c in chunks:
                piece = _read_rows(src, it.hf, c.r0, c.r1, fp8[it.hf]) if it.shape else src.read(it.hf)
                nonfinite.check(it.hf, piece)
                off, box = it.rows_box(c.r0, c.r1)
                pos = f.pos
                save_tensor(f, piece.to(target).reshape(box))
                mine.append(Record(it.key, off, box, os.path.basename(rel), pos, f.pos - pos))
                del piece
            nbytes = src.entries[it.hf].end - src.entries[it.hf].begin
            stage.item_done({"item": it.index, "file": rel, "end": f.pos, "chunks": [r.to_json() for r in mine]},
                            nbytes)
            bar.update(nbytes, 1)
        # the objects (layers' extra state) and the common state, at the end of the last file
        rel = files[-1]
        if current is not None and rel != current:
            stage.close_file(current)
        if stage.committed == len(layout):
            f = stage.file(rel, hashed=True)
            tail = []
            for key in plan.objects:
                data = object_bytes(None)
                tail.append(Record(key, None, None, os.path.basename(rel), f.pos, len(data)))
                f.write(data)
            data = object_bytes(_common_state(plan, out_dtype))
            tail.append(Record(COMMON_STATE, None, None, os.path.basename(rel), f.pos, len(data)))
            f.write(data)
            stage.item_done({"item": len(layout), "file": rel, "end": f.pos, "chunks": [r.to_json() for r in tail]})
        records = [Record.from_json(x) for rec in stage.items for x in rec.get("chunks", [])]
        bar.close()
        infos = {r: stage.close_file(r) for r in files}
        _finish_release(stage, plan, out_dtype, records, infos)
    except BaseException:
        bar.close()
        stage.abandon()
        raise
    finally:
        src.close()
    nonfinite.report()
    stage.finish()
    return _report("hf-to-mcore", out, src_bytes, time.perf_counter() - start, budget, len(plan.items))


def _hf_to_mcore_working_set(plan: Plan, src: HFDir, fp8: dict, layout, out_dtype) -> int:
    """The most bytes one step holds: a chunk as read, dequantised (FP8) and cast; or the two row
    blocks an MTP copy is compared in."""
    most = 0
    for it, _, chunks in layout:
        e = src.entries[it.hf]
        target = torch.float32 if it.key in plan.fp32_keys else out_dtype
        for c in chunks[:1]:                     # the first chunk of a tensor is its largest
            n = max(c.r1 - c.r0, 1) * numel(it.shape[1:])
            held = n * e.row_bytes // max(numel(it.shape[1:]), 1) if it.shape else itemsize(e.dtype)
            work = n * 4 if fp8[it.hf] else 0
            cast = 0 if target == (torch.float32 if fp8[it.hf] else e.dtype) else n * itemsize(target)
            most = max(most, held + work + cast)
        if it.copy_of is not None:
            rows = _rows_per(e.row_bytes, CHUNK_BYTES)
            most = max(most, 2 * min(rows, it.shape[0]) * e.row_bytes * (5 if fp8[it.hf] else 1))
    return most


#: allowance for what a step allocates besides its tensors (allocator slack, Python objects)
MARGIN = 48 << 20


def _check_copy(src: HFDir, it: Item, main: Item, fp8: dict) -> None:
    """An MTP module's embedding / head copy must equal the main one (our model shares them): the
    same bytes, or (stored differently) the same values."""
    rows = _rows_per(src.entries[it.hf].row_bytes, CHUNK_BYTES)
    for r0 in range(0, it.shape[0], rows):
        r1 = min(r0 + rows, it.shape[0])
        a = _read_rows(src, it.hf, r0, r1, fp8[it.hf])
        b = _read_rows(src, main.hf, r0, r1, fp8[main.hf])
        if a.dtype == b.dtype:
            differs = not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        else:
            a, b = a.float(), b.float()
            differs = bool(((a != b) & ~(a.isnan() & b.isnan())).any())
        if differs:
            raise ConvertError(f"--hf {src.path}: {it.hf} differs from {main.hf} (rows {r0}..{r1}): megatron-dsv3 "
                               "shares the embedding and head between the model and its MTP modules")


def _common_state(plan: Plan, out_dtype: torch.dtype) -> dict:
    hf = {k: v for k, v in plan.hf_config.items() if k != "quantization_config"}
    hf["torch_dtype"] = dtype_name(out_dtype)
    return {"checkpoint_version": 3.0, "iteration": 0, "num_floating_point_operations_so_far": 0,
            "content_metadata": dict(CONTENT_METADATA), "dsv3_hf_config": hf,
            "dsv3_converter": {"version": FORMAT_VERSION, "dtype": dtype_name(out_dtype)}}


def _finish_release(stage: Staging, plan: Plan, out_dtype, records, infos) -> None:
    """.metadata, metadata.json, then the manifest (last) in release/; the tracker and config.json."""
    from . import manifest

    tensors = {k: (torch.float32 if k in plan.fp32_keys else out_dtype, shape) for k, shape in plan.tensors.items()}
    rel_dir = stage.path(RELEASE)
    for name in os.listdir(rel_dir):          # a small file's temporary left by an interrupted finish
        if name.endswith(".tmp"):
            os.remove(os.path.join(rel_dir, name))
    entries = {os.path.basename(r): info for r, info in infos.items()}
    entries[METADATA_FILE] = write_small(os.path.join(rel_dir, METADATA_FILE),
                                         metadata_bytes(build_metadata(tensors, records)))
    entries[BACKEND_FILE] = write_small(os.path.join(rel_dir, BACKEND_FILE), BACKEND_JSON.encode())
    listed = set(manifest.list_files(rel_dir))
    if listed != set(entries):
        raise AssertionError(f"{rel_dir}: files {sorted(listed)} vs written {sorted(entries)}")
    manifest.write_manifest(rel_dir, entries)
    write_small(stage.path(TRACKER), RELEASE.encode())
    hf = _common_state(plan, out_dtype)["dsv3_hf_config"]
    write_small(stage.path("config.json"), (json.dumps(hf, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------------
# mcore-to-hf
# ------------------------------------------------------------------------------------------------
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


def resolve_mcore_dir(path: str) -> str:
    """The iteration directory of ``path``: the one its tracker file names, or ``path`` itself."""
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if text == RELEASE:
            it_dir = os.path.join(path, RELEASE)
        elif text.isdigit():
            it_dir = os.path.join(path, f"iter_{int(text):07d}")
        else:
            raise ConvertError(f"--mcore {path}: {tracker} holds {text[:40]!r}, not an iteration number")
        if not os.path.isdir(it_dir):
            raise ConvertError(f"--mcore {path}: {tracker} names {it_dir}, which does not exist")
        return it_dir
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return path
    raise ConvertError(f"--mcore {path}: neither a checkpoint directory ({TRACKER}) nor an iteration "
                       f"directory ({METADATA_FILE})")


def _fields_to_hf_config(fields: dict, vocab: int) -> dict:
    """The HF config of a launcher run's DSv3 model fields (its saved args) and padded vocabulary."""
    import dataclasses
    from types import SimpleNamespace

    from ..config import DSv3Config
    from ..config.hf_config import config_to_hf_dict

    base = {f.name: f.default for f in dataclasses.fields(DSv3Config) if f.default is not dataclasses.MISSING}
    base.update(fields)
    base["vocab_size"] = vocab
    return config_to_hf_dict(SimpleNamespace(**base))


def mcore_hf_config(common: dict, hf_config: str | None, where: str) -> tuple[dict, str]:
    """(HF config dict, where it came from) for a Megatron checkpoint."""
    if hf_config:
        return _read_hf_config(hf_config), f"--hf-config {hf_config}"
    if isinstance(common.get("dsv3_hf_config"), dict):
        return dict(common["dsv3_hf_config"]), f"{where} (written by dsv3-convert hf-to-mcore)"
    args = common.get("args")
    fields = getattr(args, "dsv3_fields", None)
    if isinstance(fields, dict) and getattr(args, "padded_vocab_size", None):
        return (_fields_to_hf_config(fields, args.padded_vocab_size),
                f"{where} (the dsv3-pretrain run's saved model arguments)")
    raise ConvertError(f"--mcore: {where} records no megatron-dsv3 model (neither dsv3-convert's config nor "
                       "dsv3-pretrain's saved arguments); give the model's config.json with --hf-config FILE")


def check_mcore_source(plan: Plan, reader: DCPReader, source: str) -> None:
    """Every Megatron tensor of the plan is there with its global shape; no other model tensor."""
    first_hf = {}
    for it in plan.items:
        first_hf.setdefault(it.key, it.hf)
    for key, shape in plan.tensors.items():
        m = reader.tensor(key)
        if m is None:
            raise ConvertError(f"--mcore {reader.path}: tensor {key!r} (HF {first_hf[key]!r}) is missing from "
                               f"the checkpoint; the model config ({source}) does not match it")
        if tuple(m.size) != tuple(shape):
            raise ConvertError(f"--mcore {reader.path}: {key}: shape {tuple(m.size)} in the checkpoint, but the "
                               f"model config ({source}) makes it {tuple(shape)} (HF {first_hf[key]!r})")
    extra = sorted((k for k in reader.keys() if is_model_key(k) and reader.tensor(k) is not None
                    and k not in plan.tensors), key=natural)
    if extra:
        raise ConvertError(f"--mcore {reader.path}: {len(extra)} model tensor(s) not in the model config "
                           f"({source}) describes ({plan.describe()}), first: {extra[0]!r}")


def _hf_layout(plan: Plan, reader: DCPReader, fp8: bool, dtype: torch.dtype | None, shard_size: int):
    """[(shard file, [(item, dtype, [(name, dtype, shape), ...])])] in writing order."""
    shards, current, size = [], [], 0
    for it in plan.items:
        if it.key in plan.fp32_keys:
            out = torch.float32
        elif fp8 and it.fp8:
            out = torch.float8_e4m3fn
        else:
            out = dtype or reader.tensor(it.key).properties.dtype
        entries = [(it.hf, out, it.shape)]
        if out == torch.float8_e4m3fn:
            entries.append((it.hf[: -len("weight")] + SCALE_SUFFIX, torch.float32, scale_shape(it.shape)))
        nbytes = sum(numel(s) * itemsize(d) for _, d, s in entries)
        if current and size + nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append((it, out, entries))
        size += nbytes
    if current:
        shards.append(current)
    n = len(shards)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]


def mcore_to_hf(mcore: str, out: str, fp8: bool = False, dtype: str | None = None,
                max_memory: str = DEFAULT_MAX_MEMORY, shard_size: str = DEFAULT_SHARD_SIZE,
                hf_config: str | None = None, dry_run: bool = False, progress: bool = True) -> dict:
    """Convert a Megatron torch_dist checkpoint of our model into a HF DeepSeek-V3 directory."""
    budget = parse_size(max_memory, "--max-memory")
    shard_bytes = parse_size(shard_size, "--shard-size")
    it_dir = resolve_mcore_dir(mcore)
    _check_manifest_sizes(it_dir)
    reader = DCPReader(it_dir)
    common = reader.common_state()
    config, source = mcore_hf_config(common, hf_config, f"{it_dir}'s common state")
    plan = build_plan(config)
    check_mcore_source(plan, reader, source)
    layout = _hf_layout(plan, reader, fp8, DTYPES[dtype] if dtype else None, shard_bytes)
    total = sum(numel(s) * itemsize(d) for _, shard in layout for _, _, es in shard for _, d, s in es)
    chunk, chunk_key = reader.largest_chunk_bytes(plan.tensors)
    expected = rss_now() + chunk + _mcore_to_hf_working_set(layout, reader) + MARGIN
    weights = [d for _, shard in layout for it, d, _ in shard if it.key not in plan.fp32_keys]
    main_dtype = max(set(weights), key=weights.count) if weights else torch.bfloat16
    if dry_run:
        names = [name for name, _ in layout]
        n_fp8 = sum(1 for _, shard in layout for _, d, _ in shard if d == torch.float8_e4m3fn)
        print(f"dsv3-convert mcore-to-hf plan (nothing written):\n"
              f"  source   {it_dir}: {len(plan.tensors)} Megatron tensors; model config from {source}\n"
              f"  model    {plan.describe()}\n"
              f"  output   {out}: {len(plan.items)} HF tensors ({n_fp8} FP8 with {FP8_BLOCK}x{FP8_BLOCK} scales), "
              f"{human(total)} in {len(names)} file(s) ({names[0]} .. {names[-1]}), + {INDEX_FILE}, config.json\n"
              f"  memory   expected peak {human(expected)} (largest stored chunk {human(chunk)}: {chunk_key}; "
              f"--max-memory {human(budget)})")
        reader.close()
        return {"items": len(plan.items), "bytes": total, "files": names, "expected_peak": expected}
    _memory_check(budget, expected, f"the process now, the largest stored chunk {human(chunk)} of {chunk_key}, "
                                    f"and {human(PIECE_BYTES)} row blocks being converted")
    fingerprint = {"direction": "mcore-to-hf", "version": FORMAT_VERSION, "source": os.path.abspath(it_dir),
                   "source_files": _dir_identity(it_dir), "fp8": fp8, "dtype": dtype,
                   "shard_size": shard_bytes, "config": config}
    stage = Staging(out, fingerprint)
    start = time.perf_counter()
    done = stage.committed
    done_bytes = sum(numel(s) * itemsize(d) for _, shard in layout for it, _, es in shard if it.index < done
                     for _, d, s in es)
    bar = Progress(total, len(plan.items), done_bytes, done, "mcore-to-hf", progress)
    nonfinite = NonFinite()
    weight_map = {}
    try:
        for rel, shard in layout:
            for it, _, entries in shard:
                weight_map.update({name: rel for name, _, _ in entries})
            if all(it.index < done for it, _, _ in shard):
                stage.close_file(rel)
                continue
            header, offsets = header_for([e for _, _, es in shard for e in es], {"format": "pt"})
            f = stage.file(rel)
            if f.pos == 0:
                f.write(header)
            for it, out_dtype, entries in shard:
                if it.index < done:
                    continue
                _write_hf_tensor(f, reader, it, out_dtype, nonfinite)
                end = offsets[entries[-1][0]][1]
                if f.pos != end:
                    raise AssertionError(f"{rel}: {it.hf} ends at {f.pos}, the header says {end}")
                nbytes = sum(numel(s) * itemsize(d) for _, d, s in entries)
                stage.item_done({"item": it.index, "file": rel, "end": f.pos}, nbytes)
                bar.update(nbytes, 1)
            stage.close_file(rel)
        bar.close()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_small(stage.path(INDEX_FILE), (json.dumps(index, indent=2) + "\n").encode())
        cfg = {k: v for k, v in config.items() if k != "quantization_config"}
        cfg["torch_dtype"] = dtype_name(main_dtype if main_dtype != torch.float8_e4m3fn else torch.bfloat16)
        if fp8:
            cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        write_small(stage.path("config.json"), (json.dumps(cfg, indent=2) + "\n").encode())
    except BaseException:
        bar.close()
        stage.abandon()
        raise
    finally:
        reader.close()
    nonfinite.report()
    stage.finish()
    return _report("mcore-to-hf", out, total, time.perf_counter() - start, budget, len(plan.items))


def _mcore_to_hf_working_set(layout, reader: DCPReader) -> int:
    """The most bytes one step holds besides the cached chunk: the rows read, cast or quantised."""
    most = 0
    for _, shard in layout:
        for it, out_dtype, _ in shard:
            cols = numel(it.shape[1:])
            rows = it.shape[0] if len(it.shape) <= 1 else min(it.shape[0], _rows_per(cols * 4, PIECE_BYTES))
            n = max(rows, 1) * cols
            stored = itemsize(reader.tensor(it.key).properties.dtype)
            extra = 14 * n if out_dtype == torch.float8_e4m3fn else n * itemsize(out_dtype)
            most = max(most, n * stored + extra)
    return most


def _write_hf_tensor(f, reader: DCPReader, it: Item, out_dtype: torch.dtype, nonfinite: NonFinite) -> None:
    rows = it.shape[0] if it.shape else 1
    step = rows if len(it.shape) <= 1 else _rows_per(numel(it.shape[1:]) * 4, PIECE_BYTES)
    scales = []
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        off, box = it.rows_box(r0, r1)
        t = reader.read_box(it.key, off, box).reshape((r1 - r0, *it.shape[1:]) if it.shape else ())
        nonfinite.check(it.hf, t)
        if out_dtype == torch.float8_e4m3fn:
            q, s = quantize_rows(t)
            f.write(tensor_bytes(q))
            scales.append(s)
        else:
            f.write(tensor_bytes(t.to(out_dtype)))
        del t
    if scales:
        f.write(tensor_bytes(torch.cat(scales)))


def _dir_identity(path: str) -> list:
    out = []
    for name in sorted(os.listdir(path)):
        st = os.stat(os.path.join(path, name))
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def _check_manifest_sizes(it_dir: str) -> None:
    """A checkpoint with a megatron-dsv3 manifest: every listed file is there with its size (the
    content is not re-hashed here; ``python -m megatron_dsv3.checkpoint.manifest verify`` does)."""
    from . import manifest

    if not os.path.isfile(manifest.manifest_path(it_dir)):
        return
    try:
        entries = manifest.read_manifest(it_dir)
    except manifest.ManifestError as e:
        raise ConvertError(f"--mcore: {e}") from None
    for rel, want in sorted(entries.items()):
        path = os.path.join(it_dir, rel)
        if not os.path.exists(path):
            raise ConvertError(f"--mcore: {path} is missing (listed in the checkpoint's manifest)")
        if os.path.getsize(path) != want["size"]:
            raise ConvertError(f"--mcore: {path} has {os.path.getsize(path)} bytes, the manifest says "
                               f"{want['size']}: the checkpoint is damaged")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3-convert", description=(
        "Convert DeepSeek-V3-family checkpoints between HF safetensors and Megatron-Core's distributed "
        "checkpoint (torch_dist), streaming a piece of a tensor at a time. An interrupted conversion, "
        "rerun with the same arguments, continues where it stopped."))
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron checkpoint (OUT/release, loadable by "
                                           "dsv3-pretrain --load OUT at any TP/PP/EP layout)")
    a.add_argument("--hf", required=True, help="HF directory (config.json + safetensors, FP8 or not)")
    a.add_argument("--out", required=True, help="new Megatron checkpoint directory")
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weight dtype in the checkpoint (default: bf16, or fp32 when the source holds fp32 "
                        "weights); FP8 weights are dequantised exactly in fp32, then cast; the expert bias "
                        "stays fp32")
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint (any layout, also dsv3-pretrain's) -> HF directory")
    b.add_argument("--mcore", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt) "
                                                  "or one iteration directory")
    b.add_argument("--out", required=True, help="new HF directory")
    b.add_argument("--fp8", action="store_true",
                   help="write the tensors DeepSeek's release stores in FP8 (decoder-layer linears, experts, "
                        "MTP layer) as float8_e4m3 with 128x128 weight_scale_inv")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the other weights (default: as stored in the checkpoint; the expert "
                        "bias is always fp32)")
    b.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help="largest safetensors file (default 5GB)")
    b.add_argument("--hf-config", default=None,
                   help="config.json of the model (default: the one hf-to-mcore stored, or the model "
                        "dsv3-pretrain saved in its arguments)")
    for s in (a, b):
        s.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY,
                       help=f"peak resident memory allowed (default {DEFAULT_MAX_MEMORY}); refused up front "
                            "when the conversion needs more")
        s.add_argument("--dry-run", action="store_true",
                       help="print the plan (tensors, bytes, files, expected peak memory) and write nothing")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def tune_malloc() -> None:
    """Keep freed buffers in the heap for reuse (glibc): without it every chunk-sized tensor is a
    fresh mmap whose pages fault in one by one, which made the FP8 paths 5x slower here and the
    peak RSS higher. No-op where glibc's mallopt is not available."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 256 << 20)      # M_MMAP_THRESHOLD: allocations below 256 MiB come from the heap
        libc.mallopt(-1, 1 << 30)        # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap for reuse
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MEGATRON_DSV3_CPU", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    tune_malloc()
    try:
        if args.command == "hf-to-mcore":
            hf_to_mcore(args.hf, args.out, args.dtype, args.max_memory, args.dry_run, not args.no_progress)
        else:
            mcore_to_hf(args.mcore, args.out, args.fp8, args.dtype, args.max_memory, args.shard_size,
                        args.hf_config, args.dry_run, not args.no_progress)
    except HFCheckpointError as e:      # (ConvertError too) the message names the tensor / file / flag
        print(f"dsv3-convert: error: {e}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Console script ``dsv3-convert``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
