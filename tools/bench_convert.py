"""Memory and throughput benchmark of dsv3-convert on a synthetic DeepSeek-V3-shaped checkpoint.

    .venv/bin/python tools/bench_convert.py [--size-gb 4.2] [--workdir /tmp/dsv3-bench-convert] [--keep]

1. writes a random bf16 HF checkpoint of about --size-gb (DeepSeek-V3's layout scaled down: MLA with q
   low-rank, one dense layer, MoE layers of 64 routed experts + 1 shared, an MTP layer; several
   safetensors shards) with tests/convert_synth.py;
2. runs ``dsv3-convert hf-to-mcore`` then ``mcore-to-hf`` as separate processes under
   ``/usr/bin/time -v`` (peak RSS of the whole process) with ``--max-memory`` = 25% of the checkpoint;
3. checks the round trip bit for bit (tensor by tensor, plain reads: bounded memory);
4. prints a table and a JSON line (GB/s = HF bytes / wall time of the whole process, start-up
   included; peak RSS / checkpoint size). ``--fp8`` adds mcore-to-hf --fp8 and hf-to-mcore of that
   FP8 export (dequantising, the path of DeepSeek's released checkpoint).

Needs about 3x --size-gb of free disk under --workdir (refused otherwise); removes it at the end
unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)


def _layers_for(size_gb: float, experts: int, hidden: int) -> int:
    import convert_synth as synth

    for layers in range(2, 400):
        cfg = synth.bench_config(experts=experts, layers=layers, hidden=hidden)
        shapes = synth.tensor_shapes(cfg)
        total = sum(2 * _numel(s) for s in shapes.values())
        if total >= size_gb * 1e9:
            return layers
    raise SystemExit(f"--size-gb {size_gb}: too large for this generator")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _timed(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, peak RSS (bytes), the converter's output."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"failed ({run.returncode}): {' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) * 1024
    return {"seconds": wall, "peak_rss": rss, "log": run.stdout.strip().splitlines()[-1]}


def _compare(a_dir: str, b_dir: str) -> int:
    """Every tensor of two HF directories equal bit for bit (one tensor in memory at a time)."""
    import torch

    from megatron_dsv3.checkpoint.safetensors_io import HFDir

    a, b = HFDir(a_dir), HFDir(b_dir)
    if set(a.entries) != set(b.entries):
        raise SystemExit(f"round trip: tensor names differ: {sorted(set(a.entries) ^ set(b.entries))[:3]}")
    for name in sorted(a.entries):
        ea, eb = a.entries[name], b.entries[name]
        if (ea.dtype, ea.shape) != (eb.dtype, eb.shape):
            raise SystemExit(f"round trip: {name}: {ea.dtype} {ea.shape} vs {eb.dtype} {eb.shape}")
        rows = ea.shape[0] if ea.shape else 1
        step = max(1, (64 << 20) // max(ea.row_bytes, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = a.read(name, r0, r1) if ea.shape else a.read(name)
            y = b.read(name, r0, r1) if eb.shape else b.read(name)
            if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                raise SystemExit(f"round trip: {name} rows {r0}..{r1} differ")
    a.close()
    b.close()
    return len(a.entries)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=4.2, help="checkpoint size to generate (>= 4 for the README)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--workdir", default="/tmp/dsv3-bench-convert")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--fp8", action="store_true",
                   help="also: mcore-to-hf --fp8 (DeepSeek's block FP8) and hf-to-mcore of that FP8 export "
                        "(dequantising, as for the released checkpoint)")
    args = p.parse_args()
    import torch

    import convert_synth as synth

    if os.path.exists(args.workdir):
        raise SystemExit(f"--workdir {args.workdir} exists; remove it or choose another")
    os.makedirs(args.workdir)
    free = shutil.disk_usage(args.workdir).free
    if free < 3.3 * args.size_gb * 1e9:
        shutil.rmtree(args.workdir)
        raise SystemExit(f"--workdir {args.workdir}: {free / 1e9:.1f} GB free, needs about {3.3 * args.size_gb:.1f}")
    hf, mcore, back = (os.path.join(args.workdir, n) for n in ("hf", "mcore", "hf_back"))
    try:
        layers = _layers_for(args.size_gb, args.experts, args.hidden)
        cfg = synth.bench_config(experts=args.experts, layers=layers, hidden=args.hidden)
        t = time.perf_counter()
        synth.write_checkpoint(hf, cfg, torch.bfloat16, seed=0, shard_bytes=int(0.5e9), fast=True)
        size = _dir_bytes(hf)
        params = sum(_numel(s) for s in synth.tensor_shapes(cfg).values())
        shards = len([f for f in os.listdir(hf) if f.endswith(".safetensors")])
        print(f"generated {hf}: {size / 1e9:.2f} GB bf16, {shards} shards, {layers} layers x {args.experts} experts "
              f"(hidden {args.hidden}) + MTP in {time.perf_counter() - t:.0f} s", flush=True)
        budget = f"{int(0.25 * size)}B"
        env = dict(os.environ, MEGATRON_DSV3_CPU="1", TORCHDYNAMO_DISABLE="1")
        conv = [sys.executable, "-m", "megatron_dsv3.checkpoint.convert"]
        a = _timed(conv + ["hf-to-mcore", "--hf", hf, "--out", mcore, "--max-memory", budget, "--no-progress"], env)
        b = _timed(conv + ["mcore-to-hf", "--mcore", mcore, "--out", back, "--max-memory", budget, "--no-progress"],
                   env)
        n = _compare(hf, back)
        runs = [("hf-to-mcore", a, size), ("mcore-to-hf", b, size)]
        if args.fp8:
            fp8, mcore8 = os.path.join(args.workdir, "hf_fp8"), os.path.join(args.workdir, "mcore_from_fp8")
            shutil.rmtree(back)
            c = _timed(conv + ["mcore-to-hf", "--mcore", mcore, "--out", fp8, "--fp8", "--max-memory", budget,
                               "--no-progress"], env)
            fp8_size = _dir_bytes(fp8)
            shutil.rmtree(mcore)
            d = _timed(conv + ["hf-to-mcore", "--hf", fp8, "--out", mcore8, "--max-memory", budget, "--no-progress"],
                       env)
            runs += [("mcore-to-hf --fp8", c, fp8_size), ("hf-to-mcore (FP8 src)", d, fp8_size)]
        rows = []
        for name, r, nbytes in runs:
            rows.append({"direction": name, "checkpoint_gb": nbytes / 1e9, "seconds": round(r["seconds"], 1),
                         "gb_per_s": round(nbytes / 1e9 / r["seconds"], 3),
                         "params_per_s_m": round(params / r["seconds"] / 1e6, 1),
                         "peak_rss_gb": round(r["peak_rss"] / 1e9, 3),
                         "peak_rss_share": round(r["peak_rss"] / size, 3)})
        print(f"round trip bit-exact: {n} tensors")
        print(f"{'direction':<22} {'HF GB':>6} {'s':>7} {'GB/s':>6} {'Mparam/s':>9} {'peak RSS GB':>12} "
              f"{'RSS/ckpt':>9}")
        for r in rows:
            print(f"{r['direction']:<22} {r['checkpoint_gb']:>6.2f} {r['seconds']:>7.1f} {r['gb_per_s']:>6.3f} "
                  f"{r['params_per_s_m']:>9.1f} {r['peak_rss_gb']:>12.3f} {r['peak_rss_share']:>9.1%}")
        print(f"(peak RSS / the {size / 1e9:.2f} GB bf16 checkpoint; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores)")
        print(json.dumps({"bench_convert": rows, "layers": layers, "experts": args.experts, "hidden": args.hidden,
                          "shards": shards, "cpus": os.cpu_count()}))
        for r in rows:
            if r["peak_rss_share"] >= 0.25:
                raise SystemExit(f"{r['direction']}: peak RSS {r['peak_rss_share']:.1%} of the checkpoint (>= 25%)")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
            for d in (mcore, back):
                shutil.rmtree(d + ".partial", ignore_errors=True)


if __name__ == "__main__":
    main()
