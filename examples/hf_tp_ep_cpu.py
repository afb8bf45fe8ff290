"""Load a HF DeepSeek-V3 checkpoint into megatron-dsv3 on CPU and check TP2 x EP2 against world size 1.

    bash examples/hf_tp_ep_cpu.sh                     # makes a tiny random DSv3 checkpoint first
    bash examples/hf_tp_ep_cpu.sh --hf-dir /path/to/hf_checkpoint

Without --hf-dir it builds the `tiny` preset (MLA with q low-rank + YaRN, 8 experts in 4 groups,
random expert bias, 1 MTP module), saves it in HF format, then loads it back twice: on one process,
and on 4 gloo ranks with tensor parallel 2 (sequence parallel) x expert parallel 2.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("MEGATRON_DSV3_CPU", "1")

import torch  # noqa: E402


def make_tiny_checkpoint(out_dir: str) -> None:
    from megatron_dsv3 import hf
    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.spec import build_model

    from megatron_dsv3.parallel.world import ensure_world; ensure_world()
    torch.manual_seed(0)
    model = build_model(DSv3Config.from_preset("tiny", **cpu_overrides(), init_method_std=0.2))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape))
    hf.save(model, out_dir, dtype=torch.float32)


def rank_main(rank: int, hf_dir: str, ids: torch.Tensor, out: str):
    from megatron_dsv3 import hf
    from megatron_dsv3.parallel.world import init_model_parallel

    init_model_parallel(tp=2, ep=2)
    model = hf.load(hf_dir)
    logits = hf.logits(model, ids)
    mtp = hf.mtp_logits(model, ids)
    if rank == 0:
        torch.save({"logits": logits, "mtp": mtp}, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", help="HF DeepSeek-V3 checkpoint directory (default: make a tiny one)")
    ap.add_argument("--output-dir", default=os.environ.get("OUTPUT_DIR", "runs/hf_tp_ep_cpu"))
    ap.add_argument("--seq-len", type=int, default=32)
    args = ap.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    hf_dir = args.hf_dir or os.path.join(args.output_dir, "tiny-dsv3-hf")
    if not args.hf_dir:
        print(f"[1/3] writing a tiny random DSv3 checkpoint to {hf_dir}")
        make_tiny_checkpoint(hf_dir)
    from megatron_dsv3 import hf
    from megatron_dsv3.parallel.world import run_cpu_world

    with open(os.path.join(hf_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = torch.randint(0, vocab, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    print("[2/3] world size 1: load + logits")
    model = hf.load(hf_dir)
    ref, ref_mtp = hf.logits(model, ids), hf.mtp_logits(model, ids)
    print("[3/3] 4 gloo ranks, TP2 x EP2 (sequence parallel): load + logits")
    out = os.path.join(args.output_dir, "tp2xep2_logits.pt")
    run_cpu_world(4, rank_main, hf_dir, ids, out)
    got = torch.load(out)
    rows = [("main logits", (got["logits"] - ref).abs().max().item(), ref.abs().max().item())]
    rows += [(f"MTP depth {k + 1}", (a - b).abs().max().item(), b.abs().max().item())
             for k, (a, b) in enumerate(zip(got["mtp"], ref_mtp))]
    print(f"\n{'output':<14} {'max |TP2xEP2 - world1|':>24} {'max |logit|':>12}")
    for name, diff, scale in rows:
        print(f"{name:<14} {diff:>24.3e} {scale:>12.3f}")
    report = {name: {"max_abs_diff": d, "max_abs_logit": s} for name, d, s in rows}
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    ok = all(d <= 1e-4 * max(1.0, s) for _, d, s in rows)
    print(f"\n{'OK' if ok else 'MISMATCH'} in {time.time() - t0:.0f}s; report: {args.output_dir}/report.json")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
