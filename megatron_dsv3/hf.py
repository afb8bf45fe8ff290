"""HF DeepSeek-V3 checkpoints in and out, and the public logits API.

    model = megatron_dsv3.hf.load(hf_dir, dtype=torch.float32)
    logits = megatron_dsv3.hf.logits(model, input_ids)          # [b, s, vocab]
    mtp = megatron_dsv3.hf.mtp_logits(model, input_ids)         # [[b, s-k, vocab] for k in 1..D]
    megatron_dsv3.hf.save(model, out_dir)

The whole conversion is the table :data:`LAYER_KEYS` (HF name -> our name, how it is sharded) plus
the three global tensors. Each rank reads only the tensors (and experts) it holds, one at a time, so
host memory stays at one tensor plus this rank's shard of the model. Expected keys, shapes and key
counts are checked; an error names the offending tensor.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import DSv3Config, cpu_overrides

log = logging.getLogger(__name__)

FP8_BLOCK = 128

# --------------------------------------------------------------------------------------------
# The table. {h}: HF layer prefix "model.layers.{L}.", {m}: our layer prefix.
# shard: rep (same on every rank) | col (TP dim 0) | row (TP dim 1) | glu (gate;up, TP dim 0 each)
#        expert_glu / expert_row (expert e on its EP rank, expert-TP like glu / row)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    hf: tuple[str, ...]
    ours: str
    shard: str
    when: str = "always"   # always | q_lora | no_q_lora | dense | moe | shared | bias | mtp


LAYER_KEYS: list[Key] = [
    Key(("{h}input_layernorm.weight",), "{m}input_layernorm.weight", "rep"),
    Key(("{h}self_attn.q_proj.weight",), "{m}self_attention.linear_q_proj.weight", "col", "no_q_lora"),
    Key(("{h}self_attn.q_a_proj.weight",), "{m}self_attention.linear_q_down_proj.weight", "rep", "q_lora"),
    Key(("{h}self_attn.q_a_layernorm.weight",), "{m}self_attention.q_layernorm.weight", "rep", "q_lora"),
    Key(("{h}self_attn.q_b_proj.weight",), "{m}self_attention.linear_q_up_proj.weight", "col", "q_lora"),
    Key(("{h}self_attn.kv_a_proj_with_mqa.weight",), "{m}self_attention.linear_kv_down_proj.weight", "rep"),
    Key(("{h}self_attn.kv_a_layernorm.weight",), "{m}self_attention.kv_layernorm.weight", "rep"),
    Key(("{h}self_attn.kv_b_proj.weight",), "{m}self_attention.linear_kv_up_proj.weight", "col"),
    Key(("{h}self_attn.o_proj.weight",), "{m}self_attention.linear_proj.weight", "row"),
    Key(("{h}post_attention_layernorm.weight",), "{m}pre_mlp_layernorm.weight", "rep"),
    Key(("{h}mlp.gate_proj.weight", "{h}mlp.up_proj.weight"), "{m}mlp.linear_fc1.weight", "glu", "dense"),
    Key(("{h}mlp.down_proj.weight",), "{m}mlp.linear_fc2.weight", "row", "dense"),
    Key(("{h}mlp.gate.weight",), "{m}mlp.router.weight", "rep", "moe"),
    Key(("{h}mlp.gate.e_score_correction_bias",), "{m}mlp.router.expert_bias", "rep", "bias"),
    Key(("{h}mlp.experts.{e}.gate_proj.weight", "{h}mlp.experts.{e}.up_proj.weight"),
        "{m}mlp.experts.local_experts.{le}.linear_fc1.weight", "expert_glu", "moe"),
    Key(("{h}mlp.experts.{e}.down_proj.weight",),
        "{m}mlp.experts.local_experts.{le}.linear_fc2.weight", "expert_row", "moe"),
    Key(("{h}mlp.shared_experts.gate_proj.weight", "{h}mlp.shared_experts.up_proj.weight"),
        "{m}mlp.shared_experts.linear_fc1.weight", "glu", "shared"),
    Key(("{h}mlp.shared_experts.down_proj.weight",), "{m}mlp.shared_experts.linear_fc2.weight", "row", "shared"),
    # MTP module only (the decoder layer inside it uses the keys above)
    Key(("{h}enorm.weight",), "{k}enorm.weight", "rep", "mtp"),
    Key(("{h}hnorm.weight",), "{k}hnorm.weight", "rep", "mtp"),
    Key(("{h}eh_proj.weight",), "{k}eh_proj.weight", "rep", "mtp"),
    Key(("{h}shared_head.norm.weight",), "{k}final_layernorm.weight", "rep", "mtp"),
]
GLOBAL_KEYS: list[Key] = [
    Key(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "col"),
    Key(("model.norm.weight",), "decoder.final_layernorm.weight", "rep"),
    Key(("lm_head.weight",), "output_layer.weight", "col"),
]
# Copies of the shared embedding / head stored with each MTP module (must equal the main ones).
MTP_SHARED_COPIES = {"{h}embed_tokens.weight": "model.embed_tokens.weight",
                     "{h}shared_head.head.weight": "lm_head.weight"}
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------------------------
# Reading HF checkpoints
# --------------------------------------------------------------------------------------------
class HFCheckpointError(ValueError):
    """A checkpoint that does not match its config or our model; the message names the tensor."""


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


# --------------------------------------------------------------------------------------------
# Which keys a model has
# --------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """This rank's view: parallel sizes/ranks and which layers it holds."""

    tp: int = 1
    tp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0
    etp: int = 1
    etp_rank: int = 0
    layer_offset: int = 0
    num_local_layers: int = 0
    has_pre: bool = True
    has_post: bool = True
    has_mtp: bool = True

    @classmethod
    def of(cls, model) -> "Layout":
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        cfg = model.config
        return cls(
            tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
            layer_offset=get_transformer_layer_offset(cfg, vp_stage=getattr(model, "vp_stage", None)),
            num_local_layers=len(model.decoder.layers), has_pre=model.pre_process,
            has_post=model.post_process, has_mtp=getattr(model, "mtp_process", False))


def _active(key: Key, cfg: DSv3Config, moe: bool, mtp: bool) -> bool:
    return {
        "always": True, "q_lora": cfg.q_lora_rank is not None, "no_q_lora": cfg.q_lora_rank is None,
        "dense": not moe, "moe": moe, "shared": moe and bool(cfg.n_shared_experts),
        "bias": moe and cfg.scoring_func == "sigmoid", "mtp": mtp,
    }[key.when]


def layer_entries(cfg: DSv3Config, hf_layer: int, ours_prefix: str, mtp_prefix: str | None):
    """(Key, hf names, our name, expert) for one HF layer; experts expanded."""
    moe = hf_layer >= cfg.first_k_dense_replace
    out = []
    for key in LAYER_KEYS:
        if not _active(key, cfg, moe, mtp_prefix is not None):
            continue
        experts = range(cfg.n_routed_experts) if key.shard.startswith("expert") else [None]
        for e in experts:
            fmt = dict(h=f"model.layers.{hf_layer}.", m=ours_prefix, k=mtp_prefix or "", e=e, le="{le}")
            out.append((key, tuple(n.format(**fmt) for n in key.hf), key.ours.format(**fmt), e))
    return out


def all_entries(cfg: DSv3Config):
    """Every (Key, hf names, our name with global layer index, expert, where) of the full model.

    ``where`` is ("decoder", layer) / ("mtp", depth) / ("global", None).
    """
    out = [(k, k.hf, k.ours, None, ("global", None)) for k in GLOBAL_KEYS]
    for L in range(cfg.num_layers):
        out += [(k, h, o, e, ("decoder", L)) for k, h, o, e in layer_entries(cfg, L, "decoder.layers.{l}.", None)]
    for d in range(cfg.mtp_num_layers or 0):
        L = cfg.num_layers + d
        for k, h, o, e in layer_entries(cfg, L, f"mtp.layers.{d}.mtp_model_layer.", f"mtp.layers.{d}."):
            out.append((k, h, o, e, ("mtp", d)))
    return out


def expected_hf_keys(cfg: DSv3Config) -> set[str]:
    names = {n for _, hf, _, _, _ in all_entries(cfg) for n in hf}
    for d in range(cfg.mtp_num_layers or 0):
        names |= {c.format(h=f"model.layers.{cfg.num_layers + d}.") for c in MTP_SHARED_COPIES}
    return names


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------
def _split(t: torch.Tensor, dim: int, n: int, r: int, name: str) -> torch.Tensor:
    if t.shape[dim] % n:
        raise HFCheckpointError(f"{name}: dim {dim} of shape {tuple(t.shape)} does not split over {n} ranks")
    return t.chunk(n, dim=dim)[r]


def shard(key: Key, tensors: list[torch.Tensor], lay: Layout, name: str) -> torch.Tensor:
    """HF full tensor(s) -> this rank's piece."""
    tp, r = (lay.etp, lay.etp_rank) if key.shard.startswith("expert") else (lay.tp, lay.tp_rank)
    kind = key.shard.removeprefix("expert_")
    if kind == "rep":
        return tensors[0]
    if kind == "col":
        return _split(tensors[0], 0, tp, r, name)
    if kind == "row":
        return _split(tensors[0], 1, tp, r, name)
    if kind == "glu":
        return torch.cat([_split(t, 0, tp, r, name) for t in tensors], dim=0)
    raise AssertionError(kind)


def unshard(key: Key, local: torch.Tensor, group) -> list[torch.Tensor]:
    """This rank's piece -> HF full tensor(s) (collective over the TP / expert-TP group)."""
    kind = key.shard.removeprefix("expert_")
    n = dist.get_world_size(group) if group is not None else 1
    if kind == "rep":
        return [local]
    if n > 1:
        parts = [torch.empty_like(local) for _ in range(n)]
        dist.all_gather(parts, local.contiguous(), group=group)
    else:
        parts = [local]
    if kind == "col":
        return [torch.cat(parts, 0)]
    if kind == "row":
        return [torch.cat(parts, 1)]
    halves = [p.chunk(2, dim=0) for p in parts]            # glu: each piece is [gate_r; up_r]
    return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]


# --------------------------------------------------------------------------------------------
# Model <-> HF mapping on this rank
# --------------------------------------------------------------------------------------------
def local_entries(model, lay: Layout):
    """(Key, hf names, our local name, expert) for the tensors this rank holds."""
    cfg = model.config
    e_local = cfg.n_routed_experts // lay.ep if cfg.n_routed_experts else 0
    out = []
    for key, hf, ours, e, (kind, idx) in all_entries(cfg):
        if kind == "global":
            if (ours.startswith("embedding") and not (lay.has_pre or lay.has_mtp)) or (
                    not ours.startswith("embedding") and not lay.has_post):
                continue
        elif kind == "decoder":
            if not lay.layer_offset <= idx < lay.layer_offset + lay.num_local_layers:
                continue
            ours = ours.replace("{l}", str(idx - lay.layer_offset))
        elif kind == "mtp" and not lay.has_mtp:
            continue
        if e is not None:
            if e // e_local != lay.ep_rank:
                continue
            ours = ours.replace("{le}", str(e % e_local))
        out.append((key, hf, ours, e))
    return out


def _tensor_table(model) -> dict[str, torch.Tensor]:
    table = dict(model.named_parameters())
    table.update(dict(model.named_buffers()))
    return table


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
    table = _tensor_table(model)
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


def to_hf_state_dict(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """The full HF-named state dict (or gradients) on every rank; collective over TP and EP.

    Pipeline parallelism is not supported here yet (a clear error).
    """
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("hf.save / to_hf_state_dict with pipeline parallelism is not supported yet")
    cfg = model.config
    lay = Layout.of(model)
    table = _tensor_table(model)
    tp_group = ps.get_tensor_model_parallel_group() if lay.tp > 1 else None
    etp_group = ps.get_expert_tensor_parallel_group() if lay.etp > 1 else None
    ep_group = ps.get_expert_model_parallel_group() if lay.ep > 1 else None
    e_local = cfg.n_routed_experts // lay.ep if cfg.n_routed_experts else 0
    out: dict[str, torch.Tensor] = {}
    # Entries come in the same order on every rank (EP ranks hold the same local expert slots), so
    # the collectives below line up.
    for key, hf_names, ours, e in local_entries(model, lay):
        t = table[ours]
        if grads:
            g = getattr(t, "main_grad", None)
            t = g if g is not None else t.grad
            if t is None:
                t = torch.zeros_like(table[ours])
        t = t.detach().float()
        full = unshard(key, t, etp_group if key.shard.startswith("expert") else tp_group)
        if e is None:
            out.update(zip(hf_names, full))
            continue
        for name, piece in zip(hf_names, full):
            parts = [piece]
            if ep_group is not None:
                parts = [torch.empty_like(piece) for _ in range(lay.ep)]
                dist.all_gather(parts, piece.contiguous(), group=ep_group)
            for r, p in enumerate(parts):
                out[name.replace(f".experts.{e}.", f".experts.{r * e_local + e % e_local}.")] = p
    if not grads:
        for d in range(cfg.mtp_num_layers or 0):
            prefix = f"model.layers.{cfg.num_layers + d}."
            for copy, main in MTP_SHARED_COPIES.items():
                out[copy.format(h=prefix)] = out[main].clone()
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _ensure_world():
    """A single-process CPU world when none exists; else the caller's parallel state."""
    from megatron.core import parallel_state as ps

    from . import cpu_backend
    from .parallel import init_model_parallel, init_world

    if not torch.cuda.is_available() or cpu_backend.requested():
        cpu_backend.enable()
    if not dist.is_initialized():
        init_world(0, 1)
    if not ps.model_parallel_is_initialized():
        init_model_parallel()


def config_for(hf_dir: str, dtype=torch.float32, **overrides) -> DSv3Config:
    """DSv3Config for a HF checkpoint on the current parallel state."""
    from megatron.core import parallel_state as ps

    from . import cpu_backend

    tp = ps.get_tensor_model_parallel_world_size()
    kw = dict(
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    if cpu_backend.is_enabled():
        kw.update({k: v for k, v in cpu_overrides().items() if k not in ("params_dtype", "bf16")})
    # HF configs carry no training coefficients: for a loaded checkpoint use the paper's, said aloud.
    training = dict(seq_aux_alpha=0.0001, bias_update_rate=0.001, mtp_lambda=0.3)
    defaulted = {k: v for k, v in training.items() if k not in overrides}
    if defaulted:
        log.info("HF config.json has no training coefficients; using the DeepSeek-V3 paper's %s "
                 "(pass them to hf.load to change)", defaulted)
    kw.update(defaulted)
    kw.update(overrides)
    return DSv3Config.from_hf_config(hf_dir, **kw)


def load(hf_dir: str, dtype=torch.float32, **config_overrides):
    """Build our DSv3 GPTModel for ``hf_dir`` and load its weights (this rank's shard)."""
    from .spec import build_model

    _ensure_world()
    cfg = config_for(hf_dir, dtype, **config_overrides)
    model = build_model(cfg)
    load_into(model, hf_dir)
    model.eval()
    return model


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def _check_sequence(model, input_ids: torch.Tensor) -> None:
    cfg = model.config
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if cfg.sequence_parallel and input_ids.shape[1] % cfg.tensor_model_parallel_size:
        raise ValueError(f"sequence length {input_ids.shape[1]} must be divisible by the tensor-parallel "
                         f"size {cfg.tensor_model_parallel_size} (sequence parallelism)")
    if input_ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for the block, then the model's previous mode (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Float logits [batch, seq, vocab] of the main model for positions 0..seq-1."""
    _check_sequence(model, input_ids)
    with _eval_mode(model):
        out = model(input_ids, _positions(input_ids), None)      # [b, s, vocab / TP]
    return _gather_vocab(out).float()


@torch.no_grad()
def mtp_logits(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """One tensor per MTP depth k: [batch, seq-k, vocab], entry i predicting token i+k+1."""
    if not model.config.mtp_num_layers:
        return []
    _check_sequence(model, input_ids)
    pos = _positions(input_ids)
    seq, depth = input_ids.shape[1], model.config.mtp_num_layers
    with _eval_mode(model):
        emb = model.embedding(input_ids=input_ids, position_ids=pos)
        hidden = model.decoder(hidden_states=emb, attention_mask=None)
        hidden = model.mtp(input_ids=input_ids, position_ids=pos, hidden_states=hidden,
                           attention_mask=None, embedding=model.embedding)
        chunks = torch.chunk(hidden, 1 + depth, dim=0)      # [main, depth 1, ..., depth D]
        out = []
        for k in range(1, 1 + depth):
            lg, _ = model.output_layer(chunks[k])               # [s, b, vocab / TP]
            out.append(_gather_vocab(lg).transpose(0, 1)[:, : seq - k].float())
    return out


def save(model, out_dir: str, dtype=torch.bfloat16) -> None:
    """Write ``model`` as a HF DeepSeek-V3 checkpoint (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    state = to_hf_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        cfg = model.config.hf_dict()
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        json.dump(cfg, f, indent=2)
    keep_fp32 = re.compile(r".*e_score_correction_bias$")
    save_file({k: (v if keep_fp32.match(k) else v.to(dtype)).contiguous() for k, v in sorted(state.items())},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
