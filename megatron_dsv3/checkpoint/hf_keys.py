"""The HF DeepSeek-V3 <-> megatron-dsv3 key table, and how each tensor is sharded over TP / EP.

The whole conversion is the table :data:`LAYER_KEYS` (HF name -> our name, how it is sharded) plus
the three global tensors. ``{h}``: HF layer prefix ``model.layers.{L}.``; ``{m}``: our layer prefix;
``{k}``: our MTP module prefix; ``{e}`` / ``{le}``: global / local expert index.

shard: rep (same on every rank) | col (TP dim 0) | row (TP dim 1) | glu (gate;up, TP dim 0 each)
       expert_glu / expert_row (expert e on its EP rank, expert-TP like glu / row)
fp8:   DeepSeek's released checkpoint stores it as float8_e4m3 with a 128x128 ``weight_scale_inv``
       (the decoder layers' linears, experts included, also inside MTP; not the router gate,
       embedding, head, eh_proj or norms)
"""
from __future__ import annotations

from contextlib import nullcontext

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import DSv3Config


class HFCheckpointError(ValueError):
    """A checkpoint that does not match its config or our model; the message names the tensor."""


FP8_BLOCK = 128


@dataclass(frozen=True)
class Key:
    hf: tuple[str, ...]
    ours: str
    shard: str
    when: str = "always"   # always | q_lora | no_q_lora | dense | moe | shared | bias | mtp
    fp8: bool = False      # FP8 + weight_scale_inv in DeepSeek's release


LAYER_KEYS: list[Key] = [
    Key(("{h}input_layernorm.weight",), "{m}input_layernorm.weight", "rep"),
    Key(("{h}self_attn.q_proj.weight",), "{m}self_attention.linear_q_proj.weight", "col", "no_q_lora", fp8=True),
    Key(("{h}self_attn.q_a_proj.weight",), "{m}self_attention.linear_q_down_proj.weight", "rep", "q_lora", fp8=True),
    Key(("{h}self_attn.q_a_layernorm.weight",), "{m}self_attention.q_layernorm.weight", "rep", "q_lora"),
    Key(("{h}self_attn.q_b_proj.weight",), "{m}self_attention.linear_q_up_proj.weight", "col", "q_lora", fp8=True),
    Key(("{h}self_attn.kv_a_proj_with_mqa.weight",), "{m}self_attention.linear_kv_down_proj.weight", "rep", fp8=True),
    Key(("{h}self_attn.kv_a_layernorm.weight",), "{m}self_attention.kv_layernorm.weight", "rep"),
    Key(("{h}self_attn.kv_b_proj.weight",), "{m}self_attention.linear_kv_up_proj.weight", "col", fp8=True),
    Key(("{h}self_attn.o_proj.weight",), "{m}self_attention.linear_proj.weight", "row", fp8=True),
    Key(("{h}post_attention_layernorm.weight",), "{m}pre_mlp_layernorm.weight", "rep"),
    Key(("{h}mlp.gate_proj.weight", "{h}mlp.up_proj.weight"), "{m}mlp.linear_fc1.weight", "glu", "dense", fp8=True),
    Key(("{h}mlp.down_proj.weight",), "{m}mlp.linear_fc2.weight", "row", "dense", fp8=True),
    Key(("{h}mlp.gate.weight",), "{m}mlp.router.weight", "rep", "moe"),
    Key(("{h}mlp.gate.e_score_correction_bias",), "{m}mlp.router.expert_bias", "rep", "bias"),
    Key(("{h}mlp.experts.{e}.gate_proj.weight", "{h}mlp.experts.{e}.up_proj.weight"),
        "{m}mlp.experts.local_experts.{le}.linear_fc1.weight", "expert_glu", "moe", fp8=True),
    Key(("{h}mlp.experts.{e}.down_proj.weight",),
        "{m}mlp.experts.local_experts.{le}.linear_fc2.weight", "expert_row", "moe", fp8=True),
    Key(("{h}mlp.shared_experts.gate_proj.weight", "{h}mlp.shared_experts.up_proj.weight"),
        "{m}mlp.shared_experts.linear_fc1.weight", "glu", "shared", fp8=True),
    Key(("{h}mlp.shared_experts.down_proj.weight",), "{m}mlp.shared_experts.linear_fc2.weight", "row", "shared", fp8=True),
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

        from ..parallel.schedules.placement import stage_view

        cfg = model.config
        place = getattr(model, "dsv3_place", None)     # a DualPipe / DualPipeV chunk: its stage's view
        with stage_view(place) if place is not None else nullcontext():
            offset = get_transformer_layer_offset(cfg, vp_stage=getattr(model, "vp_stage", None))
        return cls(
            tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
            layer_offset=offset, num_local_layers=len(model.decoder.layers), has_pre=model.pre_process,
            has_post=model.post_process, has_mtp=getattr(model, "mtp_process", False))


def _active(key: Key, cfg: DSv3Config, moe: bool, mtp: bool) -> bool:
    return {
        "always": True, "q_lora": cfg.q_lora_rank is not None, "no_q_lora": cfg.q_lora_rank is None,
        "dense": not moe, "moe": moe, "shared": moe and bool(cfg.n_shared_experts),
        "bias": moe and cfg.scoring_func == "sigmoid", "mtp": mtp,
    }[key.when]


def layer_entries(cfg: DSv3Config, hf_layer: int, ours_prefix: str, mtp_prefix: str | None):
    """(Key, hf names, our name, expert) for one HF layer; experts expanded."""
    moe = cfg.is_moe_layer(hf_layer)
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


_PER_EXPERT = re.compile(r"experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")


def grouped_expert_name(ours: str) -> str:
    """Our per-expert name (``...experts.local_experts.{le}.linear_fc1.weight``, SequentialMLP and our
    GroupedExperts) -> the name of the same tensor in Transformer Engine's grouped experts
    (TEGroupedMLP, ``--moe-grouped-gemm``): ``...experts.linear_fc1.weight{le}``, one weight per local
    expert of TE's GroupedLinear, sharded over expert-TP like the per-expert linear."""
    return _PER_EXPERT.sub(lambda m: f"experts.{m.group(2)}.weight{m.group(1)}", ours)


def local_entries(model, lay: Layout):
    """(Key, hf names, our local name, expert) for the tensors this rank holds. Routed-expert weights
    take TEGroupedMLP's names when the model has those instead of per-expert modules."""
    cfg = model.config
    e_local = cfg.n_routed_experts // lay.ep if cfg.n_routed_experts else 0
    names = set(tensor_table(model))
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
            if ours not in names and grouped_expert_name(ours) in names:
                ours = grouped_expert_name(ours)
        out.append((key, hf, ours, e))
    return out


def tensor_table(model) -> dict[str, torch.Tensor]:
    table = dict(model.named_parameters())
    table.update(dict(model.named_buffers()))
    return table


