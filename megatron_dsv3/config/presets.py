"""Model presets: the released DeepSeek models and a tiny one for CPU runs and tests."""
from __future__ import annotations

_DSV3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    # DeepSeek-V3 671B (HF config.json of deepseek-ai/DeepSeek-V3; training coefficients from the paper)
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, ffn_hidden_size=18432, moe_intermediate_size=2048,
        num_layers=61, first_k_dense_replace=3, num_attention_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        scoring_func="sigmoid", norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_scaling=_DSV3_YARN, max_position_embeddings=163840, rms_norm_eps=1e-6,
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
