"""HF ``config.json`` of DeepSeek-V3-family checkpoints <-> DSv3Config keyword arguments.

Accepted by ARCHITECTURE, not by ``model_type``: every ``DeepseekV3ForCausalLM`` (DeepSeek-V3/R1, Kimi K2
``kimi_k2``, Moonlight ...) and ``DeepseekV2ForCausalLM`` (DeepSeek-V2, V2-Lite) release. Other
architectures (DeepSeek-V3.2's sparse attention, ``deepseek_v32``) are refused naming what we lack.

A key the file omits takes transformers' default for that architecture (:data:`TRANSFORMERS_DEFAULTS`,
the values of transformers' ``DeepseekV3Config`` / ``DeepseekV2Config``; ``tests/test_config.py``
checks them against the installed transformers). Keys transformers does not define take the behaviour
of the code that serves those checkpoints (:data:`MODEL_CODE_DEFAULTS`). A key that has neither is an
error naming it.

Training coefficients: the V2 / V3 releases carry ``aux_loss_alpha`` with ``seq_aux: true`` (the
sequence-wise balance loss weight); it becomes ``seq_aux_alpha``. gamma (bias update speed) and the MTP
lambda are in no config.json and must be given.
"""
from __future__ import annotations

import json
import logging
import os

from .layout import DSv3ConfigError

log = logging.getLogger(__name__)

#: architecture -> family
ARCHITECTURES = {"DeepseekV3ForCausalLM": "v3", "DeepseekV2ForCausalLM": "v2"}
#: model_type of configs without an "architectures" entry
MODEL_TYPES = {"deepseek_v3": "v3", "deepseek_v2": "v2"}
#: architectures / model types that look related but are a different model
REFUSED = {
    "DeepseekV32ForCausalLM": "DeepSeek-V3.2's sparse attention (the lightning indexer: index_n_heads, "
                              "index_head_dim, index_topk) is not implemented by megatron-dsv3",
    "deepseek_v32": "DeepSeek-V3.2's sparse attention (the lightning indexer: index_n_heads, "
                    "index_head_dim, index_topk) is not implemented by megatron-dsv3",
}

#: transformers' defaults (5.x DeepseekV3Config / DeepseekV2Config) for the keys we read.
TRANSFORMERS_DEFAULTS: dict[str, dict] = {
    "v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
               num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
               n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
               qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
               num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, hidden_act="silu",
               max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
               attention_bias=False, rope_interleave=True, num_nextn_predict_layers=1),
    "v2": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
               max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
               attention_bias=False, first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536,
               n_group=None, n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128,
               qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None, topk_method="greedy",
               norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None, moe_intermediate_size=1407),
}
#: Keys transformers does not define: what the modeling code of these checkpoints does.
MODEL_CODE_DEFAULTS: dict[str, dict] = {
    "v3": dict(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, rope_theta=10000.0),
    "v2": dict(scoring_func="softmax", moe_layer_freq=1, num_nextn_predict_layers=0, rope_theta=10000.0),
}
#: topk_method -> (scoring function it goes with, uses group limits)
TOPK_METHODS = {"noaux_tc": ("sigmoid", True), "group_limited_greedy": ("softmax", True),
                "greedy": ("softmax", False)}


def read_hf_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no HF config at {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DSv3ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DSv3ConfigError(f"{path} holds a JSON {type(data).__name__}, not a config object")
    return data


def family_of(hf: dict) -> str:
    """'v3' / 'v2' for an accepted config; an error naming the architecture otherwise."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for name in [*archs, model_type]:
        if name in REFUSED:
            raise DSv3ConfigError(f"config.json: {name}: {REFUSED[name]}")
    known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
    if known:
        return known[0]
    if not archs and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise DSv3ConfigError(
        f"config.json: architectures {archs} (model_type {model_type!r}) is not a DeepSeek-V3-family "
        f"model; megatron-dsv3 reads {sorted(ARCHITECTURES)}")


#: keys whose explicit null means something (q_lora_rank null = a plain query projection)
NULLABLE = {"q_lora_rank"}


def _getter(hf: dict, family: str, used: dict):
    def get(key):
        if key in hf and (hf[key] is not None or key in NULLABLE):
            return hf[key]
        for table in (TRANSFORMERS_DEFAULTS[family], MODEL_CODE_DEFAULTS[family]):
            if key in table and table[key] is not None:
                used[key] = table[key]
                return table[key]
        raise DSv3ConfigError(f"config.json has no {key!r} and transformers has no default for it: add "
                              f"{key!r} to config.json")
    return get


def hf_to_config_kwargs(hf: dict, defaults_used: dict | None = None) -> dict:
    """Map HF config.json keys to DSv3Config keyword arguments.

    Returns the model fields plus ``seq_aux_alpha`` when the config carries it (``aux_loss_alpha``
    with ``seq_aux``). ``defaults_used`` (optional) receives {key: default} for every omitted key.
    """
    family = family_of(hf)
    used = {} if defaults_used is None else defaults_used
    get = _getter(hf, family, used)
    topk_method = get("topk_method")
    if topk_method not in TOPK_METHODS:
        raise DSv3ConfigError(f"config.json: topk_method {topk_method!r} is not supported; "
                              f"megatron-dsv3 implements {sorted(TOPK_METHODS)}")
    scoring, grouped = TOPK_METHODS[topk_method]
    if "scoring_func" in hf and hf["scoring_func"] != scoring:
        raise DSv3ConfigError(f"config.json: topk_method {topk_method!r} routes with {scoring} scores, but "
                              f"scoring_func is {hf['scoring_func']!r}")
    if get("tie_word_embeddings"):
        raise DSv3ConfigError("config.json: tie_word_embeddings=true is not a DeepSeek-V3 model")
    if get("attention_bias"):
        raise DSv3ConfigError("config.json: attention_bias=true: DeepSeek MLA projections have no bias")
    if get("hidden_act") != "silu":
        raise DSv3ConfigError(f"config.json: hidden_act {get('hidden_act')!r}: DeepSeek FFNs are SwiGLU (silu)")
    if family == "v3" and not get("rope_interleave"):
        raise DSv3ConfigError("config.json: rope_interleave=false: megatron-dsv3 rotates interleaved pairs "
                              "as the released DeepSeek checkpoints do")
    heads = get("num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise DSv3ConfigError("config.json: num_key_value_heads must equal num_attention_heads for MLA")
    rope_theta, rope_scaling = hf.get("rope_theta"), hf.get("rope_scaling")
    if "rope_parameters" in hf:        # transformers >= 5 writes RoPE settings here
        params = dict(hf["rope_parameters"] or {})
        rope_theta = params.pop("rope_theta", rope_theta)
        rope_scaling = params if params.get("rope_type", "default") != "default" else None
    if rope_theta is None:
        rope_theta = get("rope_theta")
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        rope_scaling.setdefault("type", rope_scaling.get("rope_type"))
    n_group, topk_group = (get("n_group"), get("topk_group")) if grouped else (1, 1)
    kwargs = dict(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        ffn_hidden_size=get("intermediate_size"), num_layers=get("num_hidden_layers"),
        num_attention_heads=heads, max_position_embeddings=get("max_position_embeddings"),
        first_k_dense_replace=get("first_k_dense_replace"), moe_layer_interval=get("moe_layer_freq"),
        q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"), rope_theta=float(rope_theta), rope_scaling=rope_scaling,
        moe_intermediate_size=get("moe_intermediate_size"), n_routed_experts=get("n_routed_experts"),
        n_shared_experts=get("n_shared_experts"), num_experts_per_tok=get("num_experts_per_tok"),
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=float(get("routed_scaling_factor")),
        scoring_func=scoring, norm_topk_prob=bool(get("norm_topk_prob")),
        rms_norm_eps=float(get("rms_norm_eps")), mtp_num_layers=get("num_nextn_predict_layers") or None,
    )
    if hf.get("aux_loss_alpha") is not None:
        if not hf.get("seq_aux", False):
            raise DSv3ConfigError(
                "config.json: aux_loss_alpha with seq_aux=false is DeepSeek-V2's batch-wise balance loss, "
                "which megatron-dsv3 does not implement (it implements the sequence-wise one); pass "
                "seq_aux_alpha (--moe-aux-loss-coeff) explicitly to train with the sequence-wise loss")
        kwargs["seq_aux_alpha"] = float(hf["aux_loss_alpha"])
    return kwargs


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
        "first_k_dense_replace": self.first_k_dense_replace, "moe_layer_freq": self.moe_layer_interval,
        "norm_topk_prob": self.norm_topk_prob, "scoring_func": self.scoring_func,
        "topk_method": "noaux_tc" if self.scoring_func == "sigmoid" else
                       ("group_limited_greedy" if (self.n_group or 1) > 1 else "greedy"),
        "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
        "tie_word_embeddings": False, "num_nextn_predict_layers": self.mtp_num_layers or 0,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        **({"aux_loss_alpha": self.seq_aux_alpha, "seq_aux": True} if self.seq_aux_alpha is not None else {}),
        "torch_dtype": "bfloat16",
    }
