"""Model presets (the released DeepSeek models and a tiny one for CPU runs and tests) and the training
recipe that goes with a preset (the report's hyper-parameters, as Megatron-LM flag values).

``deepseek-v3`` is the 671B architecture as the report PRETRAINED it: plain RoPE at 4K tokens. The
released checkpoint's config.json carries YaRN (factor 40) because it went through the two
context-extension phases afterwards (report sec. 4.3); those are flags (``--rope-type yarn`` and the
six YaRN values, see examples/context_extension.sh). A HF config.json is always used as it is.
"""
from __future__ import annotations

_DSV3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    # DeepSeek-V3 671B (shapes of deepseek-ai/DeepSeek-V3's config.json; plain RoPE at 4K as pretrained,
    # report sec. 4.2/4.3; training coefficients from the report)
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, ffn_hidden_size=18432, moe_intermediate_size=2048,
        num_layers=61, first_k_dense_replace=3, num_attention_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        scoring_func="sigmoid", norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=4096, rms_norm_eps=1e-6,
        mtp_num_layers=1, mtp_lambda=0.3, bias_update_rate=0.001, seq_aux_alpha=0.0001,
    ),
    # DeepSeek-V2-Lite 16B: no q low-rank, softmax greedy routing, 2 shared experts, no MTP.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, ffn_hidden_size=10944, moe_intermediate_size=1408,
        num_layers=27, first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        scoring_func="softmax", norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=163840, rms_norm_eps=1e-6, mtp_num_layers=None,
        bias_update_rate=None, seq_aux_alpha=0.001,
    ),
    # A few-MB model with every DSv3 feature switched on, for CPU runs and tests.
    "tiny": dict(
        vocab_size=256, hidden_size=64, ffn_hidden_size=128, moe_intermediate_size=32,
        num_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        scoring_func="sigmoid", norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=128, rms_norm_eps=1e-6, mtp_num_layers=1, mtp_lambda=0.3,
        bias_update_rate=0.001, seq_aux_alpha=0.0001,
    ),
}


#: YaRN of the released DeepSeek-V3 (both context-extension phases, report sec. 4.3).
DSV3_CONTEXT_EXTENSION_YARN = _DSV3_YARN

_T = 1e12
_SEQ = 4096
_RAMP_SAMPLES = round(469e9 / _SEQ)       # batch ramp over the first 469B tokens

#: Training recipe per preset: (Megatron-LM argument, value, where it comes from). The launcher sets
#: each one the user did not give, and prints what it set. ``samples`` rows are the token-keyed LR
#: schedule and batch ramp: applied only to sample-based runs (--train-samples), since Megatron cannot
#: mix them with --train-iters.
RECIPES: dict[str, list[tuple[str, object, str, bool]]] = {
    "deepseek-v3": [
        ("seq_length", _SEQ, "report sec. 4.2: sequence length 4K", False),
        ("lr", 2.2e-4, "report sec. 4.2: peak learning rate", False),
        ("min_lr", 2.2e-5, "report sec. 4.2: cosine decay target, then held for 333B tokens", False),
        ("adam_beta1", 0.9, "report sec. 4.2: AdamW beta1", False),
        ("adam_beta2", 0.95, "report sec. 4.2: AdamW beta2", False),
        ("weight_decay", 0.1, "report sec. 4.2: weight decay", False),
        ("clip_grad", 1.0, "report sec. 4.2: gradient clipping norm", False),
        ("init_method_std", 0.006, "report sec. 4.2: init std", False),
        ("moe_router_bias_update_schedule", "0:0.001,14.3T:0",
         "report sec. 4.2: gamma 0.001 for 14.3T tokens, 0 for the last 500B", False),
        ("mtp_loss_scaling_schedule", "0:0.3,10T:0.1", "report sec. 4.2: MTP lambda 0.3 for 10T tokens, then 0.1", False),
        ("lr_decay_style", "WSD", "report sec. 4.2: constant after warm-up, then cosine decay", True),
        ("lr_wsd_decay_style", "cosine", "report sec. 4.2: cosine decay over 4.3T tokens", True),
        ("lr_warmup_samples", 2000 * 3072, "report sec. 4.2: 2K warm-up steps (all at the ramp's first batch "
         "size 3072)", True),
        ("lr_decay_samples", round(14.3 * _T / _SEQ), "report sec. 4.2: decay ends at 10T + 4.3T tokens", True),
        ("lr_wsd_decay_samples", round(4.3 * _T / _SEQ), "report sec. 4.2: the decay spans 4.3T tokens", True),
        ("global_batch_size", 15360, "report sec. 4.2: batch size after the ramp", True),
        ("rampup_batch_size", [3072, 768, _RAMP_SAMPLES],
         "report sec. 4.2: 3072 -> 15360 sequences over 469B tokens (16 steps of 768: the report does not "
         "say the step)", True),
    ],
}
