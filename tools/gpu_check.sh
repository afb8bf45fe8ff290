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
