"""megatron_dsv3.flops against torch's FlopCounterMode on the real model, and the 671B closed form.

What FlopCounterMode (torch 2.13) counts here:
- every aten.mm / addmm / bmm at 2*m*n*k;
- SDPA: our MLA calls F.scaled_dot_product_attention(is_causal=True). With dq = dn+dr != dv (every
  DSv3 shape) the CPU has no fused kernel for the tensors as they are; our attention_kernel rule
  picks another kernel (our written-out one, or V padded for the CPU flash kernel, uncounted, below),
  so these tests pin the unpadded SDPA path (``math_attention``), where SDPA runs its math decomposition: two full-size bmm's
  (Q K^T over all s^2 pairs, then P V) with the causal mask applied element-wise. So the count is
  the FULL s^2, i.e. ``model_flops(..., causal=False)``; the backward of those bmm's is exactly 2x.
  (The registered fused-kernel formulas used on GPU -- flash/efficient/cudnn -- also ignore
  is_causal and count s^2; their backward formula adds the Q K^T recompute, 2*b*H*dq*s^2 per layer.)
  With dq == dv the CPU picks ``_scaled_dot_product_flash_attention_for_cpu``, which has no flop
  formula at all: the attention core counts 0 (test_cpu_fused_sdpa_is_not_counted).
- torch._grouped_mm (our routed experts on CPU while their products stay on torch's BLAS,
  model/gemm.py's grouped_linear) has no formula in torch 2.13: this module registers one (2 x rows x
  inner x columns of the one grouped product, from the shapes). At these sizes every product is
  below gemm.MIN_MACS, so none runs on oneDNN (whose calls FlopCounterMode would not see: the exact
  totals below would fail);
- nothing for the embedding lookup (and its backward, an index_add), norms, the router's top-k,
  the loss.
Hence forward count == model_flops(causal=False)["total"] x batch exactly, and forward+backward
== 3 x forward exactly: every matmul's inputs require grad (the first layer's input comes from the
trainable embedding, the router gate's from the residual stream), so each gets an input-grad and a
weight-grad matmul of its own size, and the router's fp32 logits do get a gradient (through the
combine weights and the balance loss).
"""
from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from megatron_dsv3.config import DSv3Config, cpu_overrides
from megatron_dsv3.training.flops import (
    PARTS,
    PEAK_TFLOPS,
    mfu,
    model_flops,
    peak_tflops,
    tflops_per_device,
    train_flops_per_iteration,
)


def _build(**overrides):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from megatron_dsv3.spec import build_model

    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    # Megatron-Core keeps MTP and MoE loss metrics in process-wide trackers sized by the FIRST
    # model's layer count; a later, deeper model in the same process would index past them.
    MTPLossLoggingHelper.tracker.clear()
    destroy_moe_metrics_tracker()
    model_parallel_cuda_manual_seed(1234)
    cfg = DSv3Config.from_preset("tiny", **cpu_overrides(), **overrides)
    model = build_model(cfg)
    model.train()
    return cfg, model


def _run(model, vocab, b, s, backward: bool):
    g = torch.Generator().manual_seed(b * 100 + s)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    pos = torch.arange(s).expand(b, s)
    fc = FlopCounterMode(display=False)
    with fc:
        loss = model(ids, pos, None, labels=labels)
        if backward:
            loss.float().mean().backward()
    counts = {mod: sum(ops.values()) for mod, ops in fc.get_flop_counts().items()}
    ops = {str(op): n for op, n in fc.get_flop_counts().get("Global", {}).items()}
    return fc.get_total_flops(), counts, ops


def _measured_parts(counts: dict, cfg) -> dict:
    """FlopCounterMode's per-module counts, grouped into model_flops' parts."""
    get = lambda name: counts.get("DSv3GPTModel." + name, 0)  # noqa: E731  (FlopCounterMode names the root by class)
    L, Ld, D = cfg.num_layers, cfg.first_k_dense_replace, cfg.mtp_num_layers or 0
    out = dict.fromkeys(PARTS + ("attn_core", "head_all"), 0)
    for i in range(L):
        p = f"decoder.layers.{i}."
        a = p + "self_attention."
        q = get(a + "linear_q_proj") + get(a + "linear_q_down_proj") + get(a + "linear_q_up_proj")
        kv = get(a + "linear_kv_down_proj") + get(a + "linear_kv_up_proj")
        o = get(a + "linear_proj")
        out["attn_q"] += q
        out["attn_kv"] += kv
        out["attn_out"] += o
        out["attn_core"] += get(p + "self_attention") - q - kv - o     # the SDPA bmm's
        if i < Ld:
            out["dense_mlp"] += get(p + "mlp")
        else:
            out["router"] += get(p + "mlp.router")
            out["routed_experts"] += get(p + "mlp.experts")
            out["shared_experts"] += get(p + "mlp.shared_experts")
            assert get(p + "mlp") == sum(get(p + "mlp." + n) for n in ("router", "experts", "shared_experts"))
    for d in range(D):
        out["mtp_eh_proj"] += get(f"mtp.layers.{d}.eh_proj")
        out["mtp_layer"] += get(f"mtp.layers.{d}.mtp_model_layer")
    out["head_all"] = get("output_layer")            # main head + the D MTP heads (one module)
    out["total"] = counts.get("Global", 0)
    return out


@register_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """2 x M x K x N summed over the groups: a [P, K] x b [E, K, N] (groups split P), a [M, P] x
    b [P, N] (groups split the inner P; output [E, M, N]), a [E, M, K] x b [K, P] (groups split P),
    or a batched [E, M, K] x [E, K, N]."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


@pytest.fixture
def math_attention(monkeypatch):
    """SDPA with the tensors as they are (its math decomposition on CPU, which FlopCounterMode sees)."""
    from megatron_dsv3.model import mla

    monkeypatch.setattr(mla, "attention_kernel", lambda *args: "sdpa")


CASES = [  # (overrides, batch, seq)
    (dict(), 2, 12),                                                        # tiny: q_lora 32, MTP 1
    (dict(q_lora_rank=None, mtp_num_layers=None), 3, 7),                    # plain q, no MTP
    (dict(q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=0), 1, 16),
    (dict(mtp_num_layers=2, num_layers=4, first_k_dense_replace=2), 2, 9),  # 2 dense, 2 MoE, MTP 2
]


@pytest.mark.parametrize("overrides,b,s", CASES, ids=["tiny", "no_q_lora_no_mtp", "all_moe_2shared", "mtp2"])
def test_matches_flop_counter(cpu_world, math_attention, overrides, b, s):
    t0 = time.perf_counter()
    cfg, model = _build(**overrides)
    want = model_flops(cfg, s, causal=False)
    assert want["total"] == sum(v for k, v in want.items() if k != "total")

    fwd, counts, ops = _run(model, cfg.vocab_size, b, s, backward=False)
    assert set(ops) <= {"aten.mm", "aten.bmm", "aten.addmm", "aten._grouped_mm"}, ops
    assert fwd == b * want["total"], (fwd, b * want["total"])
    got = _measured_parts(counts, cfg)
    for part in ("attn_q", "attn_kv", "attn_out", "dense_mlp", "router", "routed_experts",
                 "shared_experts", "mtp_eh_proj", "mtp_layer"):
        assert got[part] == b * want[part], (part, got[part], b * want[part])
    assert got["attn_core"] == b * (want["attn_scores"] + want["attn_values"])
    assert got["head_all"] == b * (want["head"] + want["mtp_head"])
    accounted = ("attn_q", "attn_kv", "attn_out", "attn_core", "dense_mlp", "router", "routed_experts",
                 "shared_experts", "mtp_eh_proj", "mtp_layer", "head_all")
    assert sum(got[k] for k in accounted) == got["total"] == fwd     # no matmul outside these modules
    # SDPA is counted as full s^2 bmm's although it runs with is_causal=True
    assert ops["aten.bmm"] == b * (cfg.num_layers + (cfg.mtp_num_layers or 0)) * 2 * \
        cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * s * s

    fwd_bwd, _, ops_fb = _run(model, cfg.vocab_size, b, s, backward=True)
    assert fwd_bwd == 3 * fwd, (fwd_bwd, fwd, fwd_bwd / fwd)
    assert fwd_bwd == train_flops_per_iteration(cfg, s, b, causal=False)
    print(f"\n{overrides} b={b} s={s}: fwd {fwd} = model_flops(causal=False) x b; fwd+bwd {fwd_bwd} "
          f"= 3.000 x fwd ({time.perf_counter() - t0:.1f} s)")


def test_cpu_fused_sdpa_is_not_counted(cpu_world):
    """dq == dv: CPU SDPA uses _scaled_dot_product_flash_attention_for_cpu, which has no flop formula."""
    cfg, model = _build(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, mtp_num_layers=None)
    b, s = 2, 10
    fwd, _, ops = _run(model, cfg.vocab_size, b, s, backward=False)
    want = model_flops(cfg, s, causal=False)
    assert "aten.bmm" not in ops
    assert fwd == b * (want["total"] - want["attn_scores"] - want["attn_values"])


def test_causal_counts_only_attended_pairs():
    cfg = DSv3Config.from_preset("tiny", **cpu_overrides())
    s = 33
    full, causal = model_flops(cfg, s, causal=False), model_flops(cfg, s)
    mask = torch.ones(s, s, dtype=torch.bool).tril()              # what is_causal attends
    layers = cfg.num_layers + cfg.mtp_num_layers
    H, dq, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    assert causal["attn_scores"] == 2 * H * dq * int(mask.sum()) * cfg.num_layers
    assert causal["attn_values"] == 2 * H * dv * int(mask.sum()) * cfg.num_layers
    assert full["total"] - causal["total"] == layers * 2 * H * (dq + dv) * (s * s - int(mask.sum()))
    for part in ("attn_q", "attn_kv", "routed_experts", "head", "mtp_eh_proj", "mtp_head"):
        assert full[part] == causal[part]


# ------------------------------------------------------------------------------------------------
# 671B: forward FLOPs = 2 x activated matmul parameters per token + the attention core
# ------------------------------------------------------------------------------------------------
def _hf_weight_shapes(c, moe: bool, routed_used: int):
    """Independent parameter table: the released checkpoint's per-layer weight shapes
    (HF names), with only ``routed_used`` of the routed experts."""
    h, H = c.hidden_size, c.num_attention_heads
    dn, dr, dv, rq, rkv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.q_lora_rank, c.kv_lora_rank
    w = {
        "self_attn.q_a_proj": (rq, h), "self_attn.q_b_proj": (H * (dn + dr), rq),
        "self_attn.kv_a_proj_with_mqa": (rkv + dr, h), "self_attn.kv_b_proj": (H * (dn + dv), rkv),
        "self_attn.o_proj": (h, H * dv),
    }
    if moe:
        I, S = c.moe_intermediate_size, c.n_shared_experts
        w["mlp.gate"] = (c.n_routed_experts, h)
        for e in range(routed_used):
            w |= {f"mlp.experts.{e}.gate_proj": (I, h), f"mlp.experts.{e}.up_proj": (I, h),
                  f"mlp.experts.{e}.down_proj": (h, I)}
        w |= {"mlp.shared_experts.gate_proj": (S * I, h), "mlp.shared_experts.up_proj": (S * I, h),
              "mlp.shared_experts.down_proj": (h, S * I)}
    else:
        F = c.ffn_hidden_size
        w |= {"mlp.gate_proj": (F, h), "mlp.up_proj": (F, h), "mlp.down_proj": (h, F)}
    return w


def _matmul_params(c, routed_used: int) -> int:
    n = 0
    for layer in range(c.num_layers):
        shapes = _hf_weight_shapes(c, c.is_moe_layer(layer), routed_used)
        n += sum(r * k for r, k in shapes.values())
    return n + c.vocab_size * c.hidden_size            # lm_head (the embedding is a lookup)


def test_671b_closed_form(capsys):
    c = DSv3Config.from_preset("deepseek-v3")
    s = 4096
    f = model_flops(c, s)
    h, V = c.hidden_size, c.vocab_size
    norms = c.num_layers * (2 * h + c.q_lora_rank + c.kv_lora_rank) + h
    total_params = _matmul_params(c, c.n_routed_experts) + V * h + norms
    active = _matmul_params(c, c.num_experts_per_tok)
    # paper: 671B total, 37B activated (main model, MTP excluded)
    assert abs(total_params / 671e9 - 1) < 0.002, total_params
    assert abs((active + V * h) / 37e9 - 1) < 0.02, active + V * h    # 37.55B incl. the embedding
    main = f["total"] - f["mtp_eh_proj"] - f["mtp_layer"] - f["mtp_head"]
    core = f["attn_scores"] + f["attn_values"]
    # the parameter-derived part of the breakdown is exactly 2 x activated matmul params per token
    assert main - core == 2 * active * s
    assert abs((main - core) / (2 * 37e9 * s) - 1) < 0.015            # vs the paper's round 37B
    # MTP depth 1: eh_proj + one MoE layer + head, same per-token rule
    moe_layer = _hf_weight_shapes(c, True, c.num_experts_per_tok)
    mtp_params = 2 * h * h + sum(r * k for r, k in moe_layer.values()) + V * h
    mtp_core = 2 * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) \
        * s * (s + 1) // 2
    assert f["mtp_eh_proj"] + f["mtp_layer"] + f["mtp_head"] == 2 * mtp_params * s + mtp_core

    train = train_flops_per_iteration(c, s, 1)
    assert train == 3 * f["total"]
    per_tok = train / s
    gpu_hours_per_t = 180e3                                              # paper: 180K H800 h / 1T tokens
    achieved = per_tok * 1e12 / (gpu_hours_per_t * 3600) / 1e12
    with capsys.disabled():
        print(f"\nDeepSeek-V3 671B, seq {s}, causal: params {total_params / 1e9:.2f}B, activated "
              f"matmul {active / 1e9:.2f}B (+{V * h / 1e9:.2f}B embedding)")
        for k in PARTS:
            print(f"  {k:15s} {f[k] / s / 1e9:9.3f} GFLOP/token fwd")
        print(f"  fwd {f['total'] / s / 1e12:.4f} TFLOP/token (main {main / s / 1e12:.4f}, MTP "
              f"{(f['total'] - main) / s / 1e12:.4f}); fwd+bwd {per_tok / 1e12:.4f} TFLOP/token; "
              f"per 4096-token sequence {train / 1e15:.3f} PFLOP")
        print(f"  paper's 180K H800 GPU-hours per 1T tokens => {achieved:.0f} TFLOP/s per GPU = "
              f"MFU {achieved / peak_tflops('NVIDIA H800', 'bf16'):.1%} of BF16 peak, "
              f"{achieved / peak_tflops('NVIDIA H800', 'fp8'):.1%} of FP8 peak")


# ------------------------------------------------------------------------------------------------
# peaks and MFU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bf16,fp8", [
    ("NVIDIA H800", 989.4, 1978.9),
    ("NVIDIA H100 80GB HBM3", 989.4, 1978.9),
    ("NVIDIA H200", 989.4, 1978.9),
    ("NVIDIA H100 PCIe", 756.5, 1513.0),
    ("NVIDIA A100-SXM4-80GB", 312.0, None),
    ("NVIDIA A100 80GB PCIe", 312.0, None),
    ("NVIDIA H100 NVL", None, None),
    ("NVIDIA H200 NVL", None, None),
    ("NVIDIA GH200 480GB", None, None),
    ("NVIDIA B200", None, None),
    ("Tesla V100-SXM2-32GB", None, None),
    ("", None, None),
])
def test_peak_tflops(name, bf16, fp8):
    assert peak_tflops(name, "bf16") == bf16
    assert peak_tflops(name, "bfloat16") == bf16
    assert peak_tflops(name, "fp8") == fp8


def test_peak_table_and_errors():
    assert PEAK_TFLOPS["H800 SXM"] == PEAK_TFLOPS["H100 SXM"] == PEAK_TFLOPS["H200 SXM"] \
        == {"bf16": 989.4, "fp8": 1978.9}
    with pytest.raises(ValueError, match="dtype"):
        peak_tflops("NVIDIA H800", "int8")
    with pytest.raises(ValueError, match="peak"):
        mfu(1e15, 1.0, 8, None)
    with pytest.raises(ValueError):
        tflops_per_device(1e15, 0.0, 8)
    with pytest.raises(ValueError):
        model_flops(DSv3Config.from_preset("deepseek-v3"), 0)


def test_mfu_arithmetic():
    flops = 8 * 989.4e12 * 2.0 * 0.4          # 8 GPUs at 40% of H800 BF16 peak for 2 s
    assert tflops_per_device(flops, 2.0, 8) == pytest.approx(0.4 * 989.4)
    assert mfu(flops, 2.0, 8, peak_tflops("NVIDIA H800", "bf16")) == pytest.approx(0.4)


def test_causal_attention_count_matches_a_measured_causal_attention():
    """An independent count: a causal attention written as one matmul pair per query row (row i
    attends to keys 0..i), measured by FlopCounterMode, equals model_flops' causal attention."""
    cfg = DSv3Config.from_preset("tiny", **cpu_overrides())
    s, H = 19, cfg.num_attention_heads
    dq, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    q, k, v = torch.randn(H, s, dq), torch.randn(H, s, dq), torch.randn(H, s, dv)
    fc = FlopCounterMode(display=False)
    with fc:
        for i in range(s):
            p = torch.softmax(q[:, i:i + 1] @ k[:, : i + 1].transpose(1, 2), dim=-1)   # [H, 1, i+1]
            p @ v[:, : i + 1]
    want = model_flops(cfg, s, causal=True)
    per_layer = (want["attn_scores"] + want["attn_values"]) // cfg.num_layers
    assert fc.get_total_flops() == per_layer
