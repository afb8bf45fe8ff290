"""Forward+backward time of our MLA and MoE layers next to Megatron-Core 0.19.2's built-in ones.

    .venv/bin/python tools/bench_layers.py [--preset tiny|small] [--iters 20] [--json out.json]
    .venv/bin/python tools/bench_layers.py --attention-kernels      # the data behind mla.attention_kernel
    .venv/bin/python tools/bench_layers.py --gemm                   # the data behind model/gemm.py's rule
    MEGATRON_DSV3_CPU_GEMM=blas .venv/bin/python tools/bench_layers.py   # ours without oneDNN products

Same config, same input, same process, the two layers' steps alternating (3 x --iters each); prints a
table and JSON with the ratio ours / Megatron-Core of the median step times (< 1 = ours faster) and
the median of the ratios within each pair of neighbouring steps. CPU here (fp32, both layers with the
CPU backend's ``keep_freed_memory``, as in training); ``tools/gpu_check.sh`` runs it on a GPU (bf16)
when one is lent. Megatron-Core's MLA is built from its local spec; its local
DotProductAttention does not accept the k_channels/v_channels MLA passes (a known 0.19.2 issue on
the local path), so the benchmark wraps it to drop them - a benchmark-only shim, not in the product.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, num_attention_heads=4, seq=32, batch=2),
    "small": dict(hidden_size=512, num_attention_heads=8, seq=256, batch=2, q_lora_rank=192,
                  kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4,
                  n_group=4, topk_group=2, ffn_hidden_size=1024),
}


def config(preset: str, device: str):
    from megatron_dsv3.config import DSv3Config, cpu_overrides

    shape = dict(SHAPES[preset])
    seq, batch = shape.pop("seq"), shape.pop("batch")
    over = cpu_overrides() if device == "cpu" else dict(transformer_impl="local", bf16=True,
                                                        params_dtype=torch.bfloat16)
    return DSv3Config.from_preset("tiny", **over, **shape), seq, batch


def megatron_mla(cfg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import build_module

    class _DPA(DotProductAttention):  # benchmark-only: drop kwargs the local DPA does not take
        def __init__(self, *a, k_channels=None, v_channels=None, **kw):
            super().__init__(*a, **kw)

    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True,
                                    normalization="RMSNorm").submodules.self_attention
    spec.submodules.core_attention = _DPA
    return build_module(spec, config=cfg, layer_number=1)


def ours_mla(cfg):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsv3.spec import get_dsv3_layer_spec

    return build_module(get_dsv3_layer_spec(cfg, moe=True).submodules.self_attention, config=cfg, layer_number=1)


def moe(cfg, ours: bool):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_dsv3.spec import get_dsv3_layer_spec

    if ours:
        builder = get_dsv3_layer_spec(cfg, moe=True).submodules.mlp
    else:
        builder = get_moe_module_spec(use_te=False, num_experts=cfg.num_moe_experts)
    from megatron.core.process_groups_config import ProcessGroupCollection

    layer = builder(config=cfg, pg_collection=ProcessGroupCollection.use_mpu_process_groups(), is_mtp_layer=False)
    layer.set_layer_number(1)
    return layer


def median_time(step, iters: int, warmup: int, cuda: bool = False) -> float:
    """Median seconds of ``step()`` over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def emit(result, out_json) -> None:
    """The machine-readable line, and the JSON file when asked for."""
    print(json.dumps(result))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)


def time_fwd_bwd_pair(modules, x, iters, mask=None) -> list[list[float]]:
    """Seconds of forward + backward of each module, the modules alternating step by step (so a shared
    machine's slow phases fall on both alike), ``iters`` steps each after 3 untimed ones."""
    def step(module):
        out = module(x, attention_mask=mask) if mask is not None else module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    for _ in range(3):
        for m in modules:
            step(m)
    times = [[] for _ in modules]
    for _ in range(iters):
        for m, t in zip(modules, times):
            start = time.perf_counter()
            step(m)
            if x.is_cuda:
                torch.cuda.synchronize()
            t.append(time.perf_counter() - start)
    return times


#: (batch, heads, seq, q/k head, v head) of the attention-kernel table: the quickstart's, the small
#: preset's and DeepSeek-V3's head sizes at several lengths.
KERNEL_SHAPES = [(4, 4, 128, 24, 16), (4, 4, 256, 24, 16), (4, 4, 512, 24, 16), (2, 8, 256, 96, 64),
                 (2, 8, 512, 96, 64), (1, 8, 1024, 96, 64), (2, 16, 256, 192, 128), (1, 16, 512, 192, 128),
                 (1, 16, 768, 192, 128), (1, 8, 2048, 192, 128)]


def attention_kernels(iters: int, out_json) -> None:
    """Forward+backward of the causal attention core on CPU: SDPA as is (math kernel: the head sizes
    differ), V zero-padded to the q/k head size (flash kernel), and our written-out kernel
    (model/mla.py ``_ExplicitAttention``); the fastest, and what the rule picks."""
    import torch.nn.functional as F

    from megatron_dsv3.model.mla import _ExplicitAttention, attention_kernel

    def run(shape, kernel):
        b, h, s, dq, dv = shape
        q, k = (torch.randn(b, h, s, dq, requires_grad=True) for _ in range(2))
        v = torch.randn(b, h, s, dv, requires_grad=True)
        bias = torch.full((s, s), float("-inf")).triu(1)

        def step():
            if kernel == "explicit":
                out = _ExplicitAttention.apply(q, k, v, dq ** -0.5, bias, None)
            else:
                vv = F.pad(v, (0, dq - dv)) if kernel == "sdpa_padded_v" else v
                out = F.scaled_dot_product_attention(q, k, vv, is_causal=True)[..., :dv]
            out.sum().backward()
        return median_time(step, iters, warmup=2)

    rows = []
    print(f"{'batch x heads x seq':>20} {'q/k':>4} {'v':>4} {'math ms':>9} {'padded ms':>10} {'explicit ms':>12}"
          f"  {'fastest':<14} rule ({torch.get_num_threads()} threads)")
    for shape in KERNEL_SHAPES:
        times = {kernel: run(shape, kernel) * 1e3 for kernel in ("sdpa", "sdpa_padded_v", "explicit")}
        fastest = min(times, key=times.get)
        pick = attention_kernel("cpu", shape[3], shape[4], shape[2], 0.0)
        rows.append({"shape": shape, "math_ms": times["sdpa"], "padded_ms": times["sdpa_padded_v"],
                     "explicit_ms": times["explicit"], "fastest": fastest, "rule": pick})
        b, h, s, dq, dv = shape
        print(f"{f'{b} x {h} x {s}':>20} {dq:>4} {dv:>4} {times['sdpa']:>9.2f} {times['sdpa_padded_v']:>10.2f} "
              f"{times['explicit']:>12.2f}  {fastest:<14} {pick}", flush=True)
    emit(rows, out_json)


#: (M, K, N) of the GEMM table: the quickstart's products around the rule's threshold, the small
#: preset's and larger ones
GEMM_SHAPES = [(512, 16, 64), (512, 64, 48), (512, 64, 64), (512, 96, 64), (512, 64, 128), (512, 64, 767),
               (128, 512, 512), (512, 512, 512), (512, 512, 1024), (2048, 512, 512)]


def gemm_table(iters: int, out_json) -> None:
    """Forward+backward of one linear layer [M, K] x [K, N] on CPU: torch's F.linear (MKL) vs
    megatron_dsv3.model.gemm on oneDNN, and what the rule picks."""
    import torch.nn.functional as F

    from megatron_dsv3.model import gemm

    def run(shape, fn):
        m, k, n = shape
        x = torch.randn(m, k, requires_grad=True)
        w = torch.randn(n, k, requires_grad=True)
        return median_time(lambda: fn(x, w).sum().backward(), iters, warmup=3)

    gemm.set_mode("onednn")
    rows = []
    print(f"{'M x K x N':>18} {'MACs':>8} {'BLAS ms':>8} {'oneDNN ms':>10} {'ratio':>6}  rule ({torch.get_num_threads()} threads)")
    for shape in GEMM_SHAPES:
        blas_s, dnn_s = run(shape, F.linear), run(shape, gemm.linear)
        macs = shape[0] * shape[1] * shape[2]
        pick = "oneDNN" if macs >= gemm.MIN_MACS else "BLAS"
        rows.append({"shape": shape, "blas_ms": blas_s * 1e3, "onednn_ms": dnn_s * 1e3, "ratio": dnn_s / blas_s,
                     "rule": pick})
        print(f"{' x '.join(map(str, shape)):>18} {macs / 1e6:>7.1f}M {blas_s * 1e3:>8.3f} {dnn_s * 1e3:>10.3f} "
              f"{dnn_s / blas_s:>6.2f}  {pick}", flush=True)
    emit(rows, out_json)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=sorted(SHAPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--attention-kernels", action="store_true",
                    help="time the attention core's CPU kernels for MLA's unequal head sizes instead")
    ap.add_argument("--gemm", action="store_true",
                    help="time one linear layer on torch's BLAS vs oneDNN (model/gemm.py's rule) instead")
    args = ap.parse_args()
    if args.attention_kernels:
        return attention_kernels(min(args.iters, 8), args.json)
    if args.gemm:
        return gemm_table(args.iters, args.json)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from megatron_dsv3 import cpu_backend
    from megatron_dsv3.parallel.world import init_model_parallel, init_world

    if device == "cpu":
        cpu_backend.enable()
        cpu_backend.keep_freed_memory(True)    # as in training (enable(training=True)), for both sides
    init_world(0, 1, backend="gloo" if device == "cpu" else "nccl")
    init_model_parallel()
    cfg, seq, batch = config(args.preset, device)
    dtype = cfg.params_dtype
    torch.manual_seed(0)
    x = torch.randn(seq, batch, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), 1)[None, None]
    rows = []
    pairs = {"MLA": (lambda: ours_mla(cfg), lambda: megatron_mla(cfg), causal),
             "MoE": (lambda: moe(cfg, True), lambda: moe(cfg, False), None)}
    for name, (make_ours, make_theirs, mask) in pairs.items():
        a, b = make_ours().to(device), make_theirs().to(device)
        t_ours, t_theirs = time_fwd_bwd_pair([a, b], x, 3 * args.iters, mask)
        o, t = statistics.median(t_ours), statistics.median(t_theirs)
        pairs_ratio = statistics.median(p / q for p, q in zip(t_ours, t_theirs))
        rows.append({"layer": name, "ours_ms": o * 1e3, "megatron_core_ms": t * 1e3, "ratio": o / t,
                     "ratio_within_pairs": pairs_ratio})
    from megatron_dsv3.model import gemm

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "cpu_gemm": gemm.mode(), "preset": args.preset, "seq": seq,
              "batch": batch,
              "dtype": str(dtype), "rows": rows}
    print(f"{'layer':<6} {'ours ms':>10} {'mcore ms':>10} {'ours/mcore':>11} {'per pair':>9}   ({result['device']}, "
          f"{args.preset}, fwd+bwd, medians of {3 * args.iters} alternating steps, {result['threads']} threads, "
          f"MEGATRON_DSV3_CPU_GEMM={result['cpu_gemm']})")
    for r in rows:
        print(f"{r['layer']:<6} {r['ours_ms']:>10.2f} {r['megatron_core_ms']:>10.2f} {r['ratio']:>11.2f} "
              f"{r['ratio_within_pairs']:>9.2f}")
    emit(result, args.json)


if __name__ == "__main__":
    main()
