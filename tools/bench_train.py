"""Training throughput of megatron-dsv3 vs Megatron-Core's built-in DeepSeek-style GPTModel, through the
same ``megatron.training`` loop, same model shape, data, batch and flags; runs interleaved.

    .venv/bin/python tools/bench_train.py                         # CPU: world size 1, one thread
    .venv/bin/python tools/bench_train.py --iters 40 --rounds 3 --json out.json
    .venv/bin/python tools/bench_train.py --concurrent --rounds 6  # both at once, one core each
    .venv/bin/python tools/bench_train.py --gpu --bf16            # on a GPU (tools/gpu_check.sh)

ours:      ``megatron_dsv3.pretrain`` (our MLA, router, MTP, experts through our specs).
built-in:  Megatron-Core 0.19.2's own GPTModel from its local (or TE) layer spec with its MLA, sigmoid
           router with expert bias and group-limited top-k, shared expert, seq_aux_loss and its MTP block,
           configured with the same Megatron-LM flags (the same DSv3 shape). Shim: Megatron's MLA passes
           k_channels / v_channels to the local DotProductAttention, which does not accept them
           (:class:`_LocalCoreAttention` drops them; the softmax scale is passed explicitly by the MLA).
           Its group score is Megatron's top-(K/G) sum, not DeepSeek's top-2 sum: a different routing
           rule at these shapes, equal work.
Measured per run: the steady-state iteration time (median of Megatron's interval timer after a warm-up),
tokens/s, TFLOP/s per device from megatron_dsv3's exact FLOP count (the same model shape, so the same
FLOPs for both), and the process's peak RSS (psutil, sampled every 20 ms). Prints a table and JSON:
the ratio of the two sides' median iteration times, and the ratio within each round (the two runs of a
round are next to each other in time, so they share most of a shared machine's slow phases) with its
median and range. Also the ratio of the fastest tenth (each run's 10th-percentile iteration time, the
median of those over rounds): on a shared machine other tenants only ever add time, so the fastest
iterations are the ones closest to what the work itself costs. It is printed next to the medians,
never instead of them.

Our CPU products follow ``MEGATRON_DSV3_CPU_GEMM`` (model/gemm.py; default ``auto``); run with
``MEGATRON_DSV3_CPU_GEMM=blas`` to measure ours on torch's BLAS like the built-in side.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: The quickstart's tiny DSv3 (examples/quickstart_cpu.sh) as Megatron-LM flags both sides understand.
SHAPE = dict(layers=4, hidden=64, heads=4, ffn=128, q_lora=32, kv_lora=16, nope=16, rope=8, v=16, experts=8,
             topk=2, groups=4, group_topk=2, moe_ffn=32, shared=32, vocab=767, seq=128)

COMMON = ["--num-layers", str(SHAPE["layers"]), "--hidden-size", str(SHAPE["hidden"]),
          "--num-attention-heads", str(SHAPE["heads"]), "--ffn-hidden-size", str(SHAPE["ffn"]),
          "--seq-length", str(SHAPE["seq"]), "--max-position-embeddings", str(SHAPE["seq"]),
          "--micro-batch-size", "4", "--global-batch-size", "16", "--lr", "3e-3", "--mock-data",
          "--tokenizer-type", "NullTokenizer", "--vocab-size", str(SHAPE["vocab"]), "--split", "98,1,1",
          "--eval-iters", "0", "--eval-interval", "100000", "--log-interval", "1", "--seed", "1234",
          "--moe-token-dispatcher-type", "alltoall"]

BUILTIN_FLAGS = [
    "--multi-latent-attention", "--q-lora-rank", str(SHAPE["q_lora"]), "--kv-lora-rank", str(SHAPE["kv_lora"]),
    "--qk-head-dim", str(SHAPE["nope"]), "--qk-pos-emb-head-dim", str(SHAPE["rope"]), "--v-head-dim", str(SHAPE["v"]),
    "--kv-channels", str(SHAPE["v"]), "--rope-type", "yarn", "--rotary-scaling-factor", "4",
    "--mscale", "1.0", "--mscale-all-dim", "1.0", "--yarn-original-max-position-embeddings", "32",
    "--yarn-beta-fast", "32", "--yarn-beta-slow", "1", "--qk-layernorm", "--attention-dropout", "0",
    "--hidden-dropout", "0",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--position-embedding-type", "none",
    "--num-experts", str(SHAPE["experts"]), "--moe-router-topk", str(SHAPE["topk"]),
    "--moe-ffn-hidden-size", str(SHAPE["moe_ffn"]), "--moe-shared-expert-intermediate-size", str(SHAPE["shared"]),
    "--moe-layer-freq", "([0]+[1]*3)", "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
    "--moe-router-bias-update-rate", "0.001", "--moe-router-num-groups", str(SHAPE["groups"]),
    "--moe-router-group-topk", str(SHAPE["group_topk"]), "--moe-router-topk-scaling-factor", "2.5",
    "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-4", "--moe-router-dtype", "fp32",
    "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3",
]

OURS_FLAGS = ["--dsv3-preset", "tiny"]

BUILTIN_DRIVER = r'''
import os, sys
from functools import partial
gpu = os.environ.get("BENCH_GPU") == "1"
if not gpu:
    from megatron_dsv3.compat import cpu_backend
    cpu_backend.enable(training=True)
import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import core_transformer_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args
from megatron_dsv3.training.providers import datasets_provider, loss_func


class _LocalCoreAttention(DotProductAttention):
    """The shim: Megatron's MLA passes k_channels / v_channels, which the local core does not take."""
    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        super().__init__(*args, **kwargs)


def _use_shim(spec):
    for layer in spec.layer_specs:
        attn = layer.submodules.self_attention.submodules
        if attn.core_attention is DotProductAttention:
            attn.core_attention = _LocalCoreAttention
    return spec


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    args = get_args()
    cfg = core_transformer_config_from_args(args)
    te = args.transformer_impl == "transformer_engine"
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=te, normalization=args.normalization)
    if not te:
        block = _use_shim(block)
    mtp = get_gpt_mtp_block_spec(cfg, block, use_transformer_engine=te)
    if mtp is not None and not te:
        for layer in mtp.layer_specs:
            inner = layer.submodules.mtp_model_layer
            if hasattr(inner, "submodules"):
                attn = inner.submodules.self_attention.submodules
                if attn.core_attention is DotProductAttention:
                    attn.core_attention = _LocalCoreAttention
    return GPTModel(config=cfg, transformer_layer_spec=block, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, share_embeddings_and_output_weights=False,
                    position_embedding_type="none", mtp_block_spec=mtp, vp_stage=vp_stage,
                    pg_collection=pg_collection)


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens, labels = batch["tokens"].cuda(), batch["labels"].cuda()
    loss_mask, position_ids = batch["loss_mask"].cuda(), batch["position_ids"].cuda()
    output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


import json, time
from megatron_dsv3.compat.patches import training_log_hook, apply
apply([training_log_hook.PATCH])
jsonl = os.environ["BENCH_JSONL"]
def _log(iteration, **kw):
    from megatron.training import get_timers
    t = get_timers()("interval-time", log_level=0)
    with open(jsonl, "a") as f:
        f.write(json.dumps({"iteration": iteration, "timer": t._active_time}) + "\n")
training_log_hook.HOOKS.append(_log)
args = parse_and_validate_args()
pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder, forward_step,
         model_provider=model_provider)
'''


def _peak_rss(proc, out: list) -> None:
    import psutil

    def tree_rss(p) -> int:
        total = p.memory_info().rss
        for child in p.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:      # a data-loader worker that ended meanwhile
                pass
        return total

    peak = 0
    try:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_rss(p))
            time.sleep(0.02)
    except psutil.NoSuchProcess:              # the run itself ended
        pass
    out.append(peak)


def _steady_seconds(path: str, key: str, warmup: int) -> list[float]:
    """The iteration times of one run after ``warmup`` iterations."""
    rows = [json.loads(line) for line in open(path)]
    if key == "timer":       # running total of Megatron's interval timer -> per-iteration differences
        totals = [r["timer"] for r in rows]
        steps = [b - a for a, b in zip(totals, totals[1:])]
    else:
        steps = [r[key] for r in rows if r.get(key)]
    steps = steps[warmup:]
    if len(steps) < 10:
        raise SystemExit(f"{path}: {len(steps)} timed iterations after the warm-up (a run stopped early?)")
    return steps


def start(side: str, iters: int, tmp: str, gpu: bool, bf16: bool, core=None) -> dict:
    """Launch one side's training run (pinned to CPU ``core`` with its data-loader workers, if given)."""
    out = os.path.join(tmp, f"{side}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29800 + (side == "builtin")),
               BENCH_JSONL=out, BENCH_GPU="1" if gpu else "0")
    flags = COMMON + ["--train-iters", str(iters)] + (["--bf16"] if bf16 else [])
    if side == "ours":
        device = [] if gpu else ["--cpu"]
        impl = ["--transformer-impl", "transformer_engine"] if gpu else []
        cmd = [sys.executable, "-m", "megatron_dsv3.pretrain", *device, *OURS_FLAGS, *flags, *impl,
               "--metrics-jsonl", out]
    else:
        impl = [] if gpu else ["--transformer-impl", "local"]
        cmd = [sys.executable, "-c", BUILTIN_DRIVER, *BUILTIN_FLAGS, *flags, *impl]
    pin = None if core is None else (lambda: os.sched_setaffinity(0, {core}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=pin)
    peak: list = []
    watcher = threading.Thread(target=_peak_rss, args=(proc, peak))
    watcher.start()
    return {"side": side, "proc": proc, "watcher": watcher, "peak": peak, "out": out}


def finish(run_: dict) -> dict:
    log, _ = run_["proc"].communicate()
    run_["watcher"].join()
    if run_["proc"].returncode:
        raise SystemExit(f"{run_['side']} run failed:\n{log[-4000:]}")
    key = "perf/iteration_time_s" if run_["side"] == "ours" else "timer"
    steps = _steady_seconds(run_["out"], key, warmup=5)
    return {"seconds": statistics.median(steps), "fastest_tenth": statistics.quantiles(steps, n=10)[0],
            "peak_rss": run_["peak"][0] if run_["peak"] else 0}


def run(side: str, iters: int, tmp: str, gpu: bool, bf16: bool) -> dict:
    return finish(start(side, iters, tmp, gpu, bf16))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="run on the GPU (Transformer Engine layers when installed)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--concurrent", action="store_true",
                    help="CPU: run the two sides at the same time, each pinned to its own core (the cores "
                         "swap every round), so both see the same phases of a noisy shared machine")
    a = ap.parse_args(argv)
    if a.iters < 17:
        ap.error(f"--iters {a.iters}: at least 17 (5 warm-up iterations, then >= 11 timed ones for the "
                 f"median and the fastest tenth)")
    if a.concurrent and (a.gpu or len(os.sched_getaffinity(0)) < 2):
        ap.error("--concurrent needs a CPU run and at least 2 cores")
    from megatron_dsv3.config import DSv3Config
    from megatron_dsv3.training.flops import train_flops_per_iteration

    cfg = DSv3Config.from_preset("tiny", num_layers=SHAPE["layers"], vocab_size=SHAPE["vocab"] + 1)
    flops = train_flops_per_iteration(cfg, SHAPE["seq"], 16)
    tokens = 16 * SHAPE["seq"]
    results = {"ours": [], "builtin": []}
    with tempfile.TemporaryDirectory() as tmp:
        cores = sorted(os.sched_getaffinity(0))[:2]
        for r in range(a.rounds):
            if a.concurrent:
                pair = {side: start(side, a.iters, tmp, a.gpu, a.bf16, core=cores[(i + r) % 2])
                        for i, side in enumerate(("ours", "builtin"))}
                done = {side: finish(run_) for side, run_ in pair.items()}
            else:
                done = {side: run(side, a.iters, tmp, a.gpu, a.bf16) for side in ("ours", "builtin")}
            for side, res in done.items():
                results[side].append(res)
                print(f"round {r + 1}/{a.rounds} {side:8s}: {res['seconds'] * 1e3:7.1f} ms/iteration "
                      f"(fastest tenth {res['fastest_tenth'] * 1e3:6.1f}), peak RSS "
                      f"{res['peak_rss'] / 2**20:7.1f} MiB", flush=True)
    summary = {}
    for side, runs in results.items():
        sec = statistics.median(r["seconds"] for r in runs)
        summary[side] = {"iteration_ms": sec * 1e3, "tokens_per_s": tokens / sec,
                         "fastest_tenth_ms": statistics.median(r["fastest_tenth"] for r in runs) * 1e3,
                         "tflops_per_device": flops / sec / 1e12,
                         "peak_rss_mib": max(r["peak_rss"] for r in runs) / 2**20}
    summary["speedup"] = summary["ours"]["tokens_per_s"] / summary["builtin"]["tokens_per_s"]
    paired = [b["seconds"] / o["seconds"] for o, b in zip(results["ours"], results["builtin"])]
    summary["speedup_per_round"] = paired
    summary["speedup_per_round_median"] = statistics.median(paired)
    summary["speedup_fastest_tenth"] = summary["builtin"]["fastest_tenth_ms"] / summary["ours"]["fastest_tenth_ms"]
    tenth = [b["fastest_tenth"] / o["fastest_tenth"] for o, b in zip(results["ours"], results["builtin"])]
    summary["speedup_fastest_tenth_per_round"] = tenth
    summary["cpu_gemm"] = os.environ.get("MEGATRON_DSV3_CPU_GEMM", "auto")
    summary["mode"] = "concurrent, one core each" if a.concurrent else "one after the other"
    summary["memory_ratio"] = summary["ours"]["peak_rss_mib"] / summary["builtin"]["peak_rss_mib"]
    print(f"\n{'':<10} {'ms/iter':>9} {'tokens/s':>10} {'TFLOP/s/dev':>12} {'fastest 10%':>12} {'peak RSS MiB':>13}")
    for side in ("ours", "builtin"):
        s = summary[side]
        print(f"{side:<10} {s['iteration_ms']:>9.1f} {s['tokens_per_s']:>10.0f} {s['tflops_per_device']:>12.5f} "
              f"{s['fastest_tenth_ms']:>12.1f} {s['peak_rss_mib']:>13.1f}")
    print(f"ours / built-in: tokens/s x{summary['speedup']:.2f}, peak memory x{summary['memory_ratio']:.2f}; "
          f"within each round x{summary['speedup_per_round_median']:.2f} (median; "
          f"{min(paired):.2f}-{max(paired):.2f}); fastest tenth x{summary['speedup_fastest_tenth']:.2f} "
          f"({min(tenth):.2f}-{max(tenth):.2f} by round); runs {summary['mode']}; "
          f"MEGATRON_DSV3_CPU_GEMM={summary['cpu_gemm']}")
    print(json.dumps(summary))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**summary, "rounds": results}, f, indent=1)


if __name__ == "__main__":
    main()
