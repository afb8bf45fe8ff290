"""HF ``config.json`` of DeepSeek-V3-family checkpoints <-> DSv3Config keyword arguments."""
from __future__ import annotations

import json
import os

from .layout import DSv3ConfigError


def read_hf_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no HF config at {path}")
    with open(path) as f:
        return json.load(f)


def hf_to_config_kwargs(hf: dict) -> dict:
    """Map HF config.json keys to DSv3Config keyword arguments (no training coefficients)."""
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise DSv3ConfigError(f"config.json model_type {model_type!r} is not deepseek_v3 / deepseek_v2")
    topk_method = hf.get("topk_method", "noaux_tc")
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring == "sigmoid" and topk_method != "noaux_tc":
        raise DSv3ConfigError(f"config.json: sigmoid scoring needs topk_method noaux_tc, got {topk_method!r}")
    if hf.get("tie_word_embeddings"):
        raise DSv3ConfigError("config.json: tie_word_embeddings=true is not a DeepSeek-V3 model")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise DSv3ConfigError("config.json: num_key_value_heads must equal num_attention_heads for MLA")
    rope_theta = hf.get("rope_theta")
    rope_scaling = hf.get("rope_scaling")
    if "rope_parameters" in hf:        # transformers >= 5 writes RoPE settings here
        params = dict(hf["rope_parameters"] or {})
        rope_theta = params.pop("rope_theta", rope_theta)
        rope_scaling = params if params.get("rope_type", "default") != "default" else None
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        rope_scaling.setdefault("type", rope_scaling.get("rope_type"))
    if rope_theta is None:
        raise DSv3ConfigError("config.json has no rope_theta")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], max_position_embeddings=hf["max_position_embeddings"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 0),
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rope_theta=float(rope_theta),
        rope_scaling=rope_scaling, moe_intermediate_size=hf["moe_intermediate_size"],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"], n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, routed_scaling_factor=float(hf["routed_scaling_factor"]),
        scoring_func=scoring, norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        mtp_num_layers=hf.get("num_nextn_predict_layers") or None,
    )


def config_to_hf_dict(self) -> dict:
    """The HF DeepSeek-V3 config.json a :class:`DSv3Config` corresponds to."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.ffn_hidden_size, "moe_intermediate_size": self.moe_intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_attention_heads,
        "n_shared_experts": self.n_shared_experts, "n_routed_experts": self.n_routed_experts,
        "routed_scaling_factor": self.routed_scaling_factor, "kv_lora_rank": self.kv_lora_rank,
        "q_lora_rank": self.q_lora_rank, "qk_rope_head_dim": self.qk_rope_head_dim,
        "v_head_dim": self.v_head_dim, "qk_nope_head_dim": self.qk_nope_head_dim,
        "n_group": self.n_group, "topk_group": self.topk_group,
        "num_experts_per_tok": self.num_experts_per_tok,
        "first_k_dense_replace": self.first_k_dense_replace, "norm_topk_prob": self.norm_topk_prob,
        "scoring_func": self.scoring_func,
        "topk_method": "noaux_tc" if self.scoring_func == "sigmoid" else "greedy",
        "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
        "tie_word_embeddings": False, "num_nextn_predict_layers": self.mtp_num_layers or 0,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
    }
