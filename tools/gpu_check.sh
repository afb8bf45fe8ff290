#!/usr/bin/env bash
# GPU-only checks in one short call (for a lent H200): environment, Transformer Engine import,
# the layer benchmark in bf16 next to Megatron-Core, and the test suite's single-process parts.
# Usage on the device machine: bash tools/gpu_check.sh   (writes under ${OUT:-/tmp/gpu_check})
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export TORCHDYNAMO_DISABLE=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
$PY -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2 >> "$OUT/pip.txt" 2>&1
$PY -m pip install -q --no-deps -e . >> "$OUT/pip.txt" 2>&1
$PY -c "import transformer_engine, transformer_engine.pytorch as te; print('TE', transformer_engine.__version__)" \
  > "$OUT/te.txt" 2>&1 || echo "Transformer Engine not importable (FP8 checks skipped)" | tee -a "$OUT/te.txt"
$PY -W ignore tools/bench_layers.py --preset small --iters 50 --json "$OUT/bench_small.json" 2>&1 | tail -5 | tee "$OUT/bench.txt"
echo "results in $OUT"

# The launcher on one GPU (NCCL, bf16): 20 steps of a 4-layer tiny DSv3 on mock data, with the
# Transformer Engine layers when TE imports, then FP8 (hybrid) on top. Each writes its metrics JSONL.
TRAIN=(--dsv3-preset tiny --num-layers 4 --seq-length 128 --micro-batch-size 4 --global-batch-size 8
       --train-iters 20 --lr 1e-3 --bf16 --mock-data --tokenizer-type NullTokenizer --vocab-size 255
       --split 98,1,1 --eval-iters 0 --eval-interval 1000 --log-interval 5 --moe-token-dispatcher-type alltoall)
if grep -q "^TE" "$OUT/te.txt"; then IMPL=(--transformer-impl transformer_engine); else IMPL=(--transformer-impl local); fi
$PY -m torch.distributed.run --nproc-per-node 1 -m megatron_dsv3.pretrain "${TRAIN[@]}" "${IMPL[@]}" \
  --metrics-jsonl "$OUT/train_bf16.jsonl" > "$OUT/train_bf16.log" 2>&1; echo "bf16 launcher run: exit $?" | tee -a "$OUT/summary.txt"
if grep -q "^TE" "$OUT/te.txt"; then
  $PY -m torch.distributed.run --nproc-per-node 1 -m megatron_dsv3.pretrain "${TRAIN[@]}" "${IMPL[@]}" \
    --fp8-format hybrid --metrics-jsonl "$OUT/train_fp8.jsonl" > "$OUT/train_fp8.log" 2>&1
  echo "fp8 launcher run: exit $?" | tee -a "$OUT/summary.txt"
fi
tail -3 "$OUT"/train_*.jsonl 2>/dev/null | cut -c1-300

# Pipeline schedules (issue 11): 1F1B, DualPipe, DualPipeV on 4 gloo ranks at equal global batch, on the
# device machine's CPU cores with CUDA hidden (4 ranks no longer share 2 cores); table + JSON.
CUDA_VISIBLE_DEVICES= MEGATRON_DSV3_CPU=1 $PY -W ignore tools/bench_schedules.py --ranks 4 --global-batch 16 \
  --steps 6 --json "$OUT/bench_schedules.json" > "$OUT/bench_schedules.txt" 2>&1
echo "schedule benchmark: exit $?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/bench_schedules.txt"
