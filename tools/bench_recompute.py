"""Activation memory and step time of selective recomputation (--recompute-modules) on CPU.

    .venv/bin/python tools/bench_recompute.py                  # tiny DSv3 at hidden 256, seq 512
    .venv/bin/python tools/bench_recompute.py --json out.json --iters 5 --hidden 256 --seq 512

For each recompute set, training steps (forward + backward, world size 1, fp32) of the tiny preset
(3 layers, 8 experts, MTP depth 1) widened to ``--hidden`` with MLA in DeepSeek-V3's proportions
(``--heads`` heads of 32 + 16 RoPE query/key dims and 32 value dims, q latent hidden/4, kv latent
hidden/8: the attention tensors per token are ~3x the hidden width, as in the 671B model).
Measured:

- ``saved_MiB``: activation memory held for backward at the end of the forward pass = the bytes of
  every distinct tensor storage autograd saved (torch.autograd.graph.saved_tensors_hooks), parameters
  excluded, counted after the forward so that outputs an output-discarding checkpoint released
  (mla_up_proj, layernorm) count 0. This is the activation part of the peak of a training step.
- ``drop``: 1 - saved / saved without recomputation.
- ``step_ms``: median wall time of a forward + backward over ``--iters`` rounds (one step of every set
  per round, after a warm-up round, so that load drift on a shared machine hits all sets alike).
- ``grad_rel``: largest |grad - grad without recompute| / max |grad without recompute| over all
  parameters (0.0 = bit-identical).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("MEGATRON_DSV3_CPU", "1")

import torch  # noqa: E402

#: The sets compared (Megatron-Core names). The report's recipe (sec. 3.2.3) is mla_up_proj
#: (+ layernorm where Transformer Engine is installed).
SETS = {
    "none": None,
    "core_attn": ["core_attn"],
    "mla_up_proj": ["mla_up_proj"],
    "mla_up_proj+core_attn": ["mla_up_proj", "core_attn"],
    "mlp": ["mlp"],
    "shared_experts": ["shared_experts"],
    "moe": ["moe"],
    "all": ["mla_up_proj", "core_attn", "mlp", "moe"],
}


def setup() -> None:
    from megatron.core import parallel_state

    from megatron_dsv3 import cpu_backend
    from megatron_dsv3.parallel.world import init_model_parallel, init_world

    if not cpu_backend.is_enabled():
        cpu_backend.enable()
    init_world(0, 1)
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel()


def build(modules, *, hidden: int, seq: int, heads: int = 16, seed: int = 3, **overrides):
    """The tiny preset at width ``hidden`` (MLA in DSv3's proportions, see the module docstring) with
    ``--recompute-granularity selective --recompute-modules modules`` (None: no recomputation),
    identical weights for every set (same seed)."""
    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.model.spec import build_model
    from megatron_dsv3.parallel.world import init_model_parallel

    init_model_parallel(seed=seed)
    recompute = {} if modules is None else dict(recompute_granularity="selective", recompute_modules=list(modules))
    kw = dict(hidden_size=hidden, ffn_hidden_size=2 * hidden, moe_intermediate_size=hidden // 2,
              max_position_embeddings=max(seq, 128), num_attention_heads=heads, qk_nope_head_dim=32,
              qk_rope_head_dim=16, v_head_dim=32, q_lora_rank=hidden // 4, kv_lora_rank=hidden // 8)
    kw.update(overrides)
    cfg = DSv3Config.from_preset("tiny", **cpu_overrides(), **kw, **recompute)
    model = build_model(cfg)
    model.train()
    return model


def batch(seq: int, micro_batch: int, vocab: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (micro_batch, seq), generator=g)
    labels = torch.randint(0, vocab, (micro_batch, seq), generator=g)
    return ids, labels


def loss_of(model, ids, labels, mask=None):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, pos, mask, labels=labels).float().mean()


def saved_bytes_and_backward(model, ids, labels, mask=None) -> int:
    """One forward + backward; returns the bytes autograd holds for backward after the forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, ids, labels, mask)
    storages = {}
    for t in saved:
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in params:
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    saved.clear()
    loss.backward()
    return sum(storages.values())


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_rel(got: dict, ref: dict) -> float:
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:3]
    return max(((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-30)).item() for k in ref)


def measure(names, args) -> list[dict]:
    """Saved bytes, gradient difference and step time of each recompute set in ``names`` (the first
    is the reference)."""
    ids, labels = batch(args.seq, args.micro_batch)
    models, rows, ref = {}, [], None
    for name in names:
        model = build(SETS[name], hidden=args.hidden, seq=args.seq, heads=args.heads)
        model.zero_grad()
        saved = saved_bytes_and_backward(model, ids, labels)
        g = grads(model)
        ref = g if ref is None else ref
        models[name] = model
        rows.append({"set": name, "modules": SETS[name] or [], "saved_MiB": saved / 2**20,
                     "grad_rel": grad_rel(g, ref)})
    times = {name: [] for name in names}
    for _ in range(args.iters + 1):
        for name in names:
            models[name].zero_grad()
            t0 = time.perf_counter()
            loss_of(models[name], ids, labels).backward()
            times[name].append(time.perf_counter() - t0)
    for row in rows:
        row["step_ms"] = 1e3 * statistics.median(times[row["set"]][1:])
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    setup()
    rows = measure(["none"] + [s for s in args.sets if s != "none"], args)
    base = rows[0]["saved_MiB"]
    for r in rows:
        r["drop"] = 1 - r["saved_MiB"] / base
    print(f"tiny DSv3, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, micro-batch {args.micro_batch}, "
          f"fp32, CPU, {torch.get_num_threads()} thread(s)")
    print(f"{'recompute set':24} {'saved MiB':>10} {'drop':>7} {'step ms':>9} {'grad rel diff':>14}")
    for r in rows:
        print(f"{r['set']:24} {r['saved_MiB']:10.2f} {r['drop']:7.1%} {r['step_ms']:9.1f} {r['grad_rel']:14.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hidden": args.hidden, "heads": args.heads, "seq": args.seq, "micro_batch": args.micro_batch,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
