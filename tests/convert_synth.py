"""Synthetic HF DeepSeek-V3 checkpoints for the converter's tests and benchmark, written from the
shapes config.json implies (computed here independently of megatron_dsv3's key table)."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def tiny_config(vocab: int = 256, layers: int = 4) -> dict:
    """The launcher's ``--dsv3-preset tiny --num-layers 4`` as a HF config.json."""
    from megatron_dsv3.config import DSv3Config

    cfg = DSv3Config.from_preset("tiny", num_layers=layers, vocab_size=vocab).hf_dict()
    return cfg


def bench_config(experts: int = 64, layers: int = 6, hidden: int = 1024) -> dict:
    """DeepSeek-V3's shape family scaled down (for the memory benchmark): MLA with q low-rank, 3 dense
    layers first... here 1, many routed experts, one shared expert, one MTP layer."""
    cfg = tiny_config()
    cfg.update({"vocab_size": 32768, "hidden_size": hidden, "intermediate_size": 4 * hidden,
                "moe_intermediate_size": hidden // 2, "num_hidden_layers": layers, "num_attention_heads": 16,
                "num_key_value_heads": 16, "n_routed_experts": experts, "n_shared_experts": 1,
                "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1,
                "q_lora_rank": hidden // 2, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
                "v_head_dim": 64, "max_position_embeddings": 4096, "rope_scaling": None})
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple]:
    """{HF name: shape} of every tensor a DeepSeek-V3 config.json implies (MTP copies included)."""
    V, h, N = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    H, nope, rope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr, E = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["n_routed_experts"]
    ffn, mffn, shared = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["n_shared_experts"]
    out = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,), "lm_head.weight": (V, h)}
    depth = cfg.get("num_nextn_predict_layers") or 0
    for L in range(N + depth):
        p = f"model.layers.{L}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if qr:
            out[p + "self_attn.q_a_proj.weight"] = (qr, h)
            out[p + "self_attn.q_a_layernorm.weight"] = (qr,)
            out[p + "self_attn.q_b_proj.weight"] = (H * (nope + rope), qr)
        else:
            out[p + "self_attn.q_proj.weight"] = (H * (nope + rope), h)
        out[p + "self_attn.kv_a_proj_with_mqa.weight"] = (kvr + rope, h)
        out[p + "self_attn.kv_a_layernorm.weight"] = (kvr,)
        out[p + "self_attn.kv_b_proj.weight"] = (H * (nope + v), kvr)
        out[p + "self_attn.o_proj.weight"] = (h, H * v)
        if L < cfg["first_k_dense_replace"]:
            out[p + "mlp.gate_proj.weight"] = (ffn, h)
            out[p + "mlp.up_proj.weight"] = (ffn, h)
            out[p + "mlp.down_proj.weight"] = (h, ffn)
        else:
            out[p + "mlp.gate.weight"] = (E, h)
            out[p + "mlp.gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                out[p + f"mlp.experts.{e}.gate_proj.weight"] = (mffn, h)
                out[p + f"mlp.experts.{e}.up_proj.weight"] = (mffn, h)
                out[p + f"mlp.experts.{e}.down_proj.weight"] = (h, mffn)
            out[p + "mlp.shared_experts.gate_proj.weight"] = (mffn * shared, h)
            out[p + "mlp.shared_experts.up_proj.weight"] = (mffn * shared, h)
            out[p + "mlp.shared_experts.down_proj.weight"] = (h, mffn * shared)
        if L >= N:
            for name, shape in (("enorm.weight", (h,)), ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
                                ("shared_head.norm.weight", (h,)), ("embed_tokens.weight", (V, h)),
                                ("shared_head.head.weight", (V, h))):
                out[p + name] = shape
    return out


def make_tensor(name: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator, fast: bool = False) -> torch.Tensor:
    if name.endswith("e_score_correction_bias"):
        return 0.1 * torch.randn(shape, generator=gen)                 # fp32 in the release
    if len(shape) == 1:
        return (1 + 0.2 * torch.randn(shape, generator=gen)).to(dtype)
    if fast:     # (the benchmark's GBs: uniform in the target dtype, no fp32 temporary)
        bound = 3 ** 0.5 / shape[1] ** 0.5
        return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=gen)
    return (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(dtype)


def write_checkpoint(path: str, cfg: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     shard_bytes: int = 1 << 20, shard_order: list[str] | None = None,
                     fast: bool = False) -> dict[str, tuple]:
    """Random weights for ``cfg`` in sharded safetensors (+ index, config.json), one shard in memory
    at a time; the MTP layer's embedding / head copies equal the main ones. Returns the shapes."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(cfg, torch_dtype=str(dtype).removeprefix("torch."))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    shapes = tensor_shapes(cfg)
    names = shard_order or list(shapes)
    gen = torch.Generator().manual_seed(seed)
    N = cfg["num_hidden_layers"]
    copies = {f"model.layers.{N + d}.embed_tokens.weight": "model.embed_tokens.weight"
              for d in range(cfg.get("num_nextn_predict_layers") or 0)}
    copies.update({f"model.layers.{N + d}.shared_head.head.weight": "lm_head.weight"
                   for d in range(cfg.get("num_nextn_predict_layers") or 0)})
    groups, cur, size = [], [], 0
    for n in names:
        b = torch.Size(shapes[n]).numel() * (4 if n.endswith("bias") else torch.empty((), dtype=dtype).element_size())
        if cur and size + b > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    groups.append(cur)
    weight_map = {}
    shared = set(copies.values())

    def dedicated(n):           # the embedding / head: its own generator, so its MTP copy is equal
        return make_tensor(n, shapes[n], dtype, torch.Generator().manual_seed(seed + 1000 + len(n)), fast)

    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        state = {}
        for n in group:
            if n in copies:
                state[n] = dedicated(copies[n])
            elif n in shared:
                state[n] = dedicated(n)
            else:
                state[n] = make_tensor(n, shapes[n], dtype, gen, fast)
        save_file(state, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        del state
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return shapes


def read_all(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory (small checkpoints only), with safetensors' own reader."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out
