"""Small random HF DeepSeek-V3 checkpoints and independent references (HF transformers + plain torch).

transformers' DeepseekV3ForCausalLM is the reference for the main model. It has no MTP module, so
the MTP reference is assembled here from HF pieces: the MTP decoder layer runs as a one-layer
DeepseekV3 model (all-MoE) fed with ``eh_proj([enorm(emb(t_{i+1})); hnorm(h0_i)])``.
"""
from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import save_file

VARIANTS = {
    # q low-rank, YaRN, 4 groups keep 2, sharded checkpoint
    "base": dict(q_lora_rank=24, sharded=True),
    # DeepSeek-V2-Lite style plain q projection, single file
    "no_q_lora": dict(q_lora_rank=None, sharded=False),
}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def hf_config_dict(q_lora_rank, num_layers=3, mtp=1) -> dict:
    """A config.json in the released DeepSeek-V3 format (rope_scaling + rope_theta)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 16, "q_lora_rank": q_lora_rank, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "qk_nope_head_dim": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": dict(YARN), "tie_word_embeddings": False,
        "num_nextn_predict_layers": mtp, "hidden_act": "silu", "attention_bias": False,
    }


def transformers_config(cfg: dict, **changes):
    from transformers import DeepseekV3Config

    cfg = {**cfg, **changes}
    rope = dict(cfg["rope_scaling"])
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = cfg["rope_theta"]
    keep = {k: v for k, v in cfg.items() if k not in (
        "architectures", "model_type", "rope_scaling", "rope_theta", "scoring_func", "topk_method",
        "num_nextn_predict_layers")}
    c = DeepseekV3Config(**keep, rope_parameters=rope, num_mtp_layers=0, initializer_range=0.1)
    c._attn_implementation = "eager"
    return c


def _hf_model(cfg):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(cfg).float().eval()


def _randomise(model, gen):
    """Non-trivial norms and a router bias big enough to change which experts are chosen."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def _per_expert(state: dict, intermediate: int) -> dict:
    """transformers' fused in-memory experts -> the per-expert tensors of the released format."""
    out = {}
    for k, v in state.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :intermediate].clone()
                out[f"{base}{e}.up_proj.weight"] = v[e, intermediate:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def make_checkpoint(path: str, variant: str = "base", seed: int = 0) -> dict:
    """Write a random HF DSv3 checkpoint (main layers + 1 MTP layer) to ``path``; returns config.json."""
    spec = VARIANTS[variant]
    cfg = hf_config_dict(spec["q_lora_rank"])
    N, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    big = _hf_model(transformers_config(cfg, num_hidden_layers=N + 1))   # layer N = the MTP layer
    _randomise(big, gen)
    state = {k: v for k, v in big.state_dict().items() if "rotary_emb" not in k}
    state = _per_expert(state, cfg["moe_intermediate_size"])
    mtp = f"model.layers.{N}."
    state[mtp + "enorm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
    state[mtp + "hnorm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
    state[mtp + "eh_proj.weight"] = 0.1 * torch.randn(h, 2 * h, generator=gen)
    state[mtp + "shared_head.norm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
    state[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state[mtp + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    write_checkpoint(path, cfg, state, sharded=spec["sharded"])
    return cfg


def write_checkpoint(path: str, cfg: dict, state: dict, sharded: bool = False) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    state = {k: v.contiguous() for k, v in state.items()}
    if not sharded:
        save_file(state, os.path.join(path, "model.safetensors"))
        return
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, os.path.join(path, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def read_state(path: str) -> dict:
    from megatron_dsv3.hf import HFCheckpoint

    ck = HFCheckpoint(path)
    return {k: ck._raw(k) for k in ck.keys()}


def _fused_experts(state: dict, prefix: str, n_experts: int) -> dict:
    gate_up = torch.stack([torch.cat([state[f"{prefix}{e}.gate_proj.weight"],
                                      state[f"{prefix}{e}.up_proj.weight"]]) for e in range(n_experts)])
    down = torch.stack([state[f"{prefix}{e}.down_proj.weight"] for e in range(n_experts)])
    return {prefix[:-1] + ".gate_up_proj": gate_up, prefix[:-1] + ".down_proj": down}


def load_reference(path: str):
    """(main HF model, MTP reference module) in fp32 from a checkpoint written by make_checkpoint."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    state = {k: v.float() for k, v in read_state(path).items()}
    N, E = cfg["num_hidden_layers"], cfg["n_routed_experts"]
    main = _hf_model(transformers_config(cfg))
    main_state = {k: v for k, v in state.items()
                  if not k.startswith("model.layers.") or int(k.split(".")[2]) < N}
    for L in range(cfg["first_k_dense_replace"], N):
        prefix = f"model.layers.{L}.mlp.experts."
        main_state.update(_fused_experts(state, prefix, E))
        for k in [k for k in main_state if k.startswith(prefix) and k.count(".") > 5]:
            del main_state[k]
    missing, unexpected = main.load_state_dict(main_state, strict=False)
    assert not [m for m in missing if "rotary" not in m] and not unexpected, (missing, unexpected)
    mtp = MTPReference(cfg, state)
    return main, mtp


class MTPReference(torch.nn.Module):
    """Depth-1 MTP built from HF modules, independent of megatron_dsv3."""

    def __init__(self, cfg: dict, state: dict):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

        N, h, E = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["n_routed_experts"]
        p = f"model.layers.{N}."
        self.embed = torch.nn.Embedding.from_pretrained(state["model.embed_tokens.weight"])
        self.enorm = DeepseekV3RMSNorm(h, cfg["rms_norm_eps"])
        self.hnorm = DeepseekV3RMSNorm(h, cfg["rms_norm_eps"])
        self.enorm.weight.data.copy_(state[p + "enorm.weight"])
        self.hnorm.weight.data.copy_(state[p + "hnorm.weight"])
        self.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
        self.eh_proj.weight.data.copy_(state[p + "eh_proj.weight"])
        # The MTP decoder layer as a one-layer all-MoE model whose final norm is shared_head.norm.
        self.block = _hf_model(transformers_config(cfg, num_hidden_layers=1, first_k_dense_replace=0))
        sd = {"model.norm.weight": state[p + "shared_head.norm.weight"],
              "lm_head.weight": state[p + "shared_head.head.weight"],
              "model.embed_tokens.weight": state["model.embed_tokens.weight"]}
        layer = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        layer.update(_fused_experts(layer, "mlp.experts.", E))
        for k, v in layer.items():
            if k.startswith(("self_attn.", "mlp.", "input_layernorm", "post_attention_layernorm")) \
                    and not (k.startswith("mlp.experts.") and k.count(".") > 3):
                sd["model.layers.0." + k] = v
        missing, unexpected = self.block.load_state_dict(sd, strict=False)
        assert not [m for m in missing if "rotary" not in m] and not unexpected, (missing, unexpected)

    @torch.no_grad()
    def forward(self, main: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        h0 = main.model(input_ids).last_hidden_state                # after the final norm
        u = self.eh_proj(torch.cat([self.enorm(self.embed(input_ids[:, 1:])), self.hnorm(h0[:, :-1])], -1))
        return self.block(inputs_embeds=u).logits                   # [b, s-1, vocab]


def quantize_fp8(w: torch.Tensor, block: int = 128):
    """Blockwise FP8 (e4m3) quantisation: returns (w_fp8, scale_inv) with w ~= w_fp8 * scale_inv."""
    rows, cols = w.shape
    nb_r, nb_c = -(-rows // block), -(-cols // block)
    scale = torch.empty(nb_r, nb_c)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nb_r):
        for j in range(nb_c):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def routing_without(cfg: dict, main, input_ids, layer: int, *, bias: bool, groups: bool):
    """Experts chosen in ``layer`` with the bias and/or group limit switched off (for checks that the
    test inputs exercise them)."""
    gate = main.model.layers[layer].mlp.gate
    g = copy.deepcopy(gate)
    captured = {}
    hook = main.model.layers[layer].mlp.register_forward_pre_hook(
        lambda mod, args: captured.setdefault("x", args[0].detach()))
    with torch.no_grad():
        main(input_ids)
    hook.remove()
    x = captured["x"].reshape(-1, cfg["hidden_size"])
    _, _, with_all = gate(x)
    if not bias:
        g.e_score_correction_bias.zero_()
    if not groups:
        g.num_group, g.topk_group = 1, 1
    _, _, changed = g(x)
    return with_all.sort(-1).values, changed.sort(-1).values
