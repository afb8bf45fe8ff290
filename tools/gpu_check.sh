#!/usr/bin/env bash
# The GPU check: every GPU-only test and the side-by-side benchmarks in one call, under 8 minutes on one
# H200, nothing fetched from the network. Writes a summary table to stdout and $OUT/summary.md (+ JSON).
#
#   bash tools/gpu_check.sh                       # on the GPU machine, from the repository root
#   OUT=/tmp/gc PYTHON=python3 BUDGET_S=450 bash tools/gpu_check.sh
#
# Steps (each with its own time limit; a step that would start past BUDGET_S is skipped, said why):
#   env           torch / CUDA / device, Megatron-Core, Transformer Engine (versions, FP8 / blockwise support)
#   gpu_tests     the GPU-only tests: tests/test_fp8.py's Transformer Engine build per FP8 recipe
#                 (delayed, tensorwise, blockwise: the report's map runs in FP8, eh_proj / head do not)
#   layers        tools/bench_layers.py --preset small in bf16: our MLA / MoE vs Megatron-Core's built-ins
#   train_bf16    the launcher on one GPU, a small DSv3 (4 layers, hidden 1024, 16 experts), bf16:
#                 tokens/s and MFU from its metrics (H200 dense peaks: training/flops.py)
#   train_fp8     the same with --fp8-format e4m3 --fp8-recipe blockwise (Transformer Engine)
#   fp8_node_limited  FP8 experts behind the node_limited dispatcher (the 671B recipe's pairing), 10 steps
#   schedules     tools/bench_schedules.py: 1F1B / DualPipe / DualPipeV on 4 CPU ranks (CUDA hidden)
#   train_vs_mcore tools/bench_train.py --gpu --bf16: ours vs Megatron-Core's own DSv3-style GPTModel
#                 through the same training loop (runs last, only within the budget)
#
# Without a GPU, Transformer Engine or Megatron-Core the affected steps are skipped with the reason; the
# exit code is 0 when no step that ran failed, 1 otherwise, 2 when no CUDA GPU is visible.
# Megatron-Core is not installed here (no network): when the Python lacks it, a copy of the package
# directory can be carried in (e.g. .venv/lib/python3.11/site-packages/megatron, 21 MB; $MEGATRON_DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-450}"
START=$(date +%s)
export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/steps.tsv"

log() { echo "[gpu_check] $*" | tee -a "$OUT/gpu_check.log"; }
elapsed() { echo $(( $(date +%s) - START )); }

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record the status
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - $(elapsed) ))
  if (( left < 20 )); then
    printf '%s\tskipped\t0\ttime budget (%ss) spent\n' "$name" "$BUDGET_S" >> "$OUT/steps.tsv"
    log "$name: skipped (time budget spent)"; return 0
  fi
  (( limit > left )) && limit=$left
  log "$name: running (limit ${limit}s)"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  local dt=$(( $(date +%s) - t0 )) status=ok why=""
  if (( rc == 124 || rc == 137 )); then status=FAILED; why="timed out after ${limit}s"
  elif (( rc != 0 )); then status=FAILED; why="exit $rc: $(grep -E 'Error|error|FAILED|assert' "$OUT/$name.log" | tail -1 | cut -c1-160)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$why" >> "$OUT/steps.tsv"
  log "$name: $status (${dt}s) $why"
}

skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$OUT/steps.tsv"; log "$1: skipped ($2)"; }

# ---------------------------------------------------------------------------------------------- env
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  for cand in "${MEGATRON_DIR:-}" .venv/lib/python3*/site-packages/megatron; do
    if [ -n "$cand" ] && [ -f "$cand/core/__init__.py" ]; then
      mkdir -p "$OUT/shim" && ln -sfn "$(cd "$cand" && pwd)" "$OUT/shim/megatron"
      export PYTHONPATH="$OUT/shim:$PYTHONPATH"; log "Megatron-Core from the carried copy $cand"; break
    fi
  done
fi
"$PY" - > "$OUT/env.json" 2> "$OUT/env.err" <<'PYEOF'
import importlib.util, json
env = {}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.is_available())
    if env["gpu"]:
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   memory_mib=p.total_memory // 2**20)
except Exception as e:  # noqa: BLE001
    env["torch_error"] = repr(e)
try:
    import megatron.core
    env["megatron_core"] = megatron.core.__version__
except Exception as e:  # noqa: BLE001
    env["megatron_core_error"] = repr(e)
if importlib.util.find_spec("transformer_engine") is not None:
    try:
        import argparse
        from megatron_dsv3.training.fp8 import fp8_machine_problems, te_status
        s = te_status()
        env["transformer_engine"] = s["version"]
        env["fp8"] = {r: fp8_machine_problems(argparse.Namespace(fp8="e4m3", fp8_recipe=r, fp8_emulation=False), s)
                      for r in ("delayed", "tensorwise", "blockwise")}
    except Exception as e:  # noqa: BLE001
        env["transformer_engine_error"] = repr(e)
print(json.dumps(env))
PYEOF
cat "$OUT/env.json" | tee -a "$OUT/gpu_check.log"
has() { "$PY" -c "import json,sys; e=json.load(open('$OUT/env.json')); sys.exit(0 if $1 else 1)" 2>/dev/null; }
GPU=0; has 'e.get("gpu")' && GPU=1
MCORE=0; has 'str(e.get("megatron_core", "")).startswith("0.19.2")' && MCORE=1
TE=0; has 'e.get("transformer_engine")' && TE=1
BLOCKWISE=0; has 'e.get("fp8", {}).get("blockwise") == []' && BLOCKWISE=1

if (( ! MCORE )); then
  log "Megatron-Core 0.19.2 is not importable by $PY ($(head -c 300 "$OUT/env.json")): every step needs it."
  log "Install it where there is network (pip install --no-deps megatron-core==0.19.2) or carry its package"
  log "directory (MEGATRON_DIR=...); nothing is fetched here."
fi
if (( ! GPU )); then log "no CUDA GPU is visible to $PY: the GPU steps are skipped"; fi
if (( GPU && ! TE )); then log "Transformer Engine is not importable: FP8 steps run nothing (pip install 'megatron-dsv3[te]')"; fi

# ---------------------------------------------------------------------------------------------- steps
if (( GPU && MCORE )); then
  if "$PY" -c "import pytest" 2>/dev/null; then
    step gpu_tests 180 "$PY" -m pytest -q -p no:warnings -p no:cacheprovider tests/test_fp8.py -k te_build -rs
  else skip gpu_tests "pytest is not installed for $PY"; fi
  step layers 120 "$PY" -W ignore tools/bench_layers.py --preset small --iters 30 --json "$OUT/layers.json"

  SMALL=(--dsv3-preset tiny --num-layers 4 --hidden-size 1024 --ffn-hidden-size 2816 --num-attention-heads 8
         --q-lora-rank 384 --kv-lora-rank 256 --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128
         --num-experts 16 --moe-ffn-hidden-size 512 --moe-router-topk 4 --moe-router-num-groups 4
         --moe-router-group-topk 2 --rope-type rope --seq-length 1024 --max-position-embeddings 1024
         --micro-batch-size 4 --global-batch-size 16 --train-iters 30 --lr 3e-4 --bf16 --mock-data
         --tokenizer-type NullTokenizer --vocab-size 32000 --split 98,1,1 --eval-iters 0 --eval-interval 1000
         --log-interval 5 --moe-token-dispatcher-type alltoall)
  if (( TE )); then IMPL=(--transformer-impl transformer_engine --moe-grouped-gemm); else IMPL=(--transformer-impl local); fi
  step train_bf16 150 "$PY" -m torch.distributed.run --nproc-per-node 1 --master-port 29611 -m megatron_dsv3.pretrain \
    "${SMALL[@]}" "${IMPL[@]}" --metrics-jsonl "$OUT/train_bf16.jsonl"
  if (( TE && BLOCKWISE )); then
    step train_fp8 150 "$PY" -m torch.distributed.run --nproc-per-node 1 --master-port 29612 -m megatron_dsv3.pretrain \
      "${SMALL[@]}" "${IMPL[@]}" --fp8-format e4m3 --fp8-recipe blockwise --moe-router-padding-for-fp8 \
      --metrics-jsonl "$OUT/train_fp8.jsonl"
  elif (( TE )); then
    step train_fp8 150 "$PY" -m torch.distributed.run --nproc-per-node 1 --master-port 29612 -m megatron_dsv3.pretrain \
      "${SMALL[@]}" "${IMPL[@]}" --fp8-format hybrid --fp8-recipe delayed --moe-router-padding-for-fp8 \
      --metrics-jsonl "$OUT/train_fp8.jsonl"
    log "train_fp8 ran the delayed recipe: this GPU / TE lacks blockwise ($(head -c 300 "$OUT/env.json"))"
  else skip train_fp8 "Transformer Engine is not importable"; fi
else
  for s in gpu_tests layers train_bf16 train_fp8; do skip "$s" "$( ((GPU)) && echo 'no Megatron-Core 0.19.2' || echo 'no CUDA GPU')"; done
fi
# The 671B recipe's combination: FP8 experts behind the node_limited dispatcher, which does not pad the
# tokens per expert for FP8 (--moe-router-padding-for-fp8 is refused there); does TE accept the GEMMs?
if (( GPU && MCORE && TE )); then
  NL=(--moe-token-dispatcher-type node_limited --ranks-per-node 1 --moe-router-num-groups 1 --moe-router-group-topk 1
      --moe-dispatch-fp8)
  step fp8_node_limited 120 "$PY" -m torch.distributed.run --nproc-per-node 1 --master-port 29613 \
    -m megatron_dsv3.pretrain "${SMALL[@]}" "${IMPL[@]}" --fp8-format e4m3 \
    --fp8-recipe "$( ((BLOCKWISE)) && echo blockwise || echo delayed)" "${NL[@]}" --train-iters 10 \
    --metrics-jsonl "$OUT/fp8_node_limited.jsonl"
else skip fp8_node_limited "needs a GPU, Megatron-Core and Transformer Engine"; fi
if (( MCORE )) && [ -f tools/bench_schedules.py ]; then
  step schedules 120 env CUDA_VISIBLE_DEVICES= MEGATRON_DSV3_CPU=1 OMP_NUM_THREADS=2 "$PY" -W ignore \
    tools/bench_schedules.py --ranks 4 --global-batch 16 --steps 6 --json "$OUT/schedules.json"
else skip schedules "tools/bench_schedules.py or Megatron-Core missing"; fi
if (( GPU && MCORE )) && [ -f tools/bench_train.py ]; then
  step train_vs_mcore 150 "$PY" -W ignore tools/bench_train.py --gpu --bf16 --iters 20 --rounds 1 \
    --json "$OUT/train_vs_mcore.json"
else skip train_vs_mcore "no CUDA GPU / Megatron-Core"; fi

# ---------------------------------------------------------------------------------------------- summary
"$PY" - "$OUT" "$(elapsed)" <<'PYEOF' | tee "$OUT/summary.md"
import datetime, json, os, statistics, sys
out, took = sys.argv[1], sys.argv[2]

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def metrics(name):
    rows = []
    try:
        with open(os.path.join(out, name)) as f:
            rows = [json.loads(l) for l in f]
    except (OSError, ValueError):
        return None
    tail = rows[len(rows) // 2:] or rows
    med = lambda k: statistics.median(r[k] for r in tail if r.get(k) is not None) if any(r.get(k) is not None for r in tail) else None
    return {"tokens_per_s": med("perf/tokens_per_s"), "mfu": med("perf/mfu"), "tflops": med("perf/tflops_per_device"),
            "loss": rows[-1].get("train/lm_loss") if rows else None}

env = load("env.json") or {}
figures = {}
lay = load("layers.json")
if lay:
    figures["layers"] = "; ".join(f"{r['layer']} ours {r['ours_ms']:.2f} ms vs Megatron-Core {r['megatron_core_ms']:.2f} ms "
                                  f"(x{r['ratio']:.2f})" for r in lay["rows"])
for name in ("train_bf16", "train_fp8"):
    m = metrics(name + ".jsonl")
    if m and m["tokens_per_s"]:
        mfu = f", MFU {100 * m['mfu']:.1f}%" if m["mfu"] is not None else ""
        figures[name] = f"{m['tokens_per_s']:,.0f} tokens/s, {m['tflops']:.1f} TFLOP/s{mfu}, last LM loss {m['loss']:.3f}"
sch = load("schedules.json")
if sch:
    figures["schedules"] = "; ".join(f"{r.get('schedule')} {r.get('step_ms', float('nan')):.0f} ms/step" for r in sch
                                     if isinstance(r, dict))
tv = load("train_vs_mcore.json")
if tv:
    figures["train_vs_mcore"] = (f"ours {tv['ours']['tokens_per_s']:,.0f} vs built-in {tv['builtin']['tokens_per_s']:,.0f} "
                                 f"tokens/s (x{tv['speedup']:.2f})")
print(f"# GPU check, {datetime.date.today().isoformat()}, {env.get('device', 'no GPU')} "
      f"(torch {env.get('torch')}, CUDA {env.get('cuda')}, Megatron-Core {env.get('megatron_core')}, "
      f"Transformer Engine {env.get('transformer_engine')}), {took} s\n")
print("| step | status | s | figures / reason |\n|---|---|---|---|")
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, status, dt, why = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
        print(f"| {name} | {status} | {dt} | {figures.get(name, '') if status == 'ok' else why} |")
if env.get("fp8"):
    print("\nFP8 recipes on this machine: " + "; ".join(f"{r}: {'ok' if not p else p[0]}" for r, p in env["fp8"].items()))
json.dump({"env": env, "figures": figures}, open(os.path.join(out, "summary.json"), "w"), indent=1)
PYEOF
log "results in $OUT (summary.md, summary.json, one log per step)"
if (( ! GPU )); then exit 2; fi
if grep -q $'\tFAILED\t' "$OUT/steps.tsv"; then exit 1; fi
exit 0
