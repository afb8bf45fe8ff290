#!/usr/bin/env bash
# megatron-dsv3 quickstart: train a tiny DeepSeek-V3 (MLA + aux-loss-free MoE + MTP) on 4 CPU ranks
# with gloo, on Megatron-Core's own training loop, with TP=2, PP=2 and EP=2 at once, the pipeline run by
# DeepSeek's DualPipe schedule and the experts' tokens moved by the node-limited all-to-all (each rank
# plays one node: --ranks-per-node 1, routing groups = the 2 nodes of an EP group, M = 1).
#
#   bash examples/quickstart_cpu.sh                 # everything under runs/quickstart
#   OUTPUT_DIR=/tmp/qs ITERS=300 bash examples/quickstart_cpu.sh
#
# On a fresh machine it first builds .venv/ (tools/setup_env.sh, CPU torch only), then generates the
# corpus and tokenizer (tools/make_quickstart_data.py: synthetic text, trained BPE, nothing
# downloaded), trains, saves checkpoints, exports the last one as a HF checkpoint and prints where
# everything is. W&B runs offline. About 5-7 minutes on 2 cores (plus the one-time set-up).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTPUT_DIR="${OUTPUT_DIR:-runs/quickstart}"
ITERS="${ITERS:-100}"
NPROC=4

bash tools/setup_env.sh
PY="$ROOT/.venv/bin/python"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1 WANDB_MODE="${WANDB_MODE:-offline}" PYTHONUNBUFFERED=1
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR="$(cd "$OUTPUT_DIR" && pwd)"
rm -rf "$OUTPUT_DIR/checkpoints" "$OUTPUT_DIR/hf" "$OUTPUT_DIR/wandb" "$OUTPUT_DIR/metrics.jsonl"

echo "[quickstart] data -> $OUTPUT_DIR/data"
if [ ! -f "$OUTPUT_DIR/data/quickstart_text_document.idx" ]; then
  "$PY" tools/make_quickstart_data.py --out "$OUTPUT_DIR/data" > "$OUTPUT_DIR/data.log" 2>&1 \
    || { tail -30 "$OUTPUT_DIR/data.log"; exit 1; }
fi
grep -E "^(corpus|tokenizer):" "$OUTPUT_DIR/data.log" || true

MODEL=(--cpu --dsv3-preset tiny --num-layers 4 --seq-length 128 --max-position-embeddings 128
       --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUTPUT_DIR/data/tokenizer")
PARALLEL=(--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2
          --pipeline-schedule dualpipe --expert-model-parallel-size 2 --expert-tensor-parallel-size 1
          --moe-token-dispatcher-type node_limited --ranks-per-node 1
          --moe-router-num-groups 2 --moe-router-group-topk 1)
TRAIN=(--micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4
       --lr-decay-style cosine --lr-warmup-iters 10 --clip-grad 1.0 --weight-decay 0.1 --seed 1234
       --moe-router-bias-update-schedule "0:0.001,$(( ITERS * 16 * 128 * 9 / 10 )):0"
       --data-path "$OUTPUT_DIR/data/quickstart_text_document" --split 98,2,0
       --eval-interval 50 --eval-iters 2)
OUT=(--save "$OUTPUT_DIR/checkpoints" --save-interval 50 --log-interval 10
     --wandb-project megatron-dsv3-quickstart --wandb-exp-name quickstart --wandb-save-dir "$OUTPUT_DIR/wandb"
     --metrics-jsonl "$OUTPUT_DIR/metrics.jsonl")

echo "[quickstart] training on $NPROC gloo ranks (TP2 x PP2 with DualPipe, EP2 with node-limited dispatch) -> $OUTPUT_DIR/train.log"
"$PY" -m torch.distributed.run --nproc-per-node $NPROC --master-port "${MASTER_PORT:-29517}" \
  -m megatron_dsv3.pretrain "${MODEL[@]}" "${PARALLEL[@]}" "${TRAIN[@]}" "${OUT[@]}" 2>&1 \
  | tee "$OUTPUT_DIR/train.log" \
  | grep --line-buffered -E "iteration +[0-9]+/|\[dsv3\]|validation loss|Traceback|Error|error:" \
  | sed -u -E -e 's/\[Rank [0-9]+\] \(after [0-9]+ iterations\) memory \(MB\)( \| [a-z ]+: [0-9.]+)*//g' \
            -e 's/ \| (consumed samples|load_balancing_loss|number of (skipped|nan) iterations|loss scale)[^|]*//g'

echo "[quickstart] exporting the last checkpoint as HF DeepSeek-V3 -> $OUTPUT_DIR/hf"
"$PY" -m torch.distributed.run --nproc-per-node 1 --master-port "${MASTER_PORT:-29518}" \
  -m megatron_dsv3.pretrain "${MODEL[@]}" --moe-router-num-groups 2 --moe-router-group-topk 1 \
  --micro-batch-size 4 --global-batch-size 16 \
  --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10 \
  --data-path "$OUTPUT_DIR/data/quickstart_text_document" --split 98,2,0 --eval-iters 0 \
  --eval-interval 1000 --load "$OUTPUT_DIR/checkpoints" --export-hf "$OUTPUT_DIR/hf" \
  > "$OUTPUT_DIR/export.log" 2>&1 || { tail -30 "$OUTPUT_DIR/export.log"; exit 1; }

"$PY" - "$OUTPUT_DIR" <<'PYEOF'
import json, os, sys
from megatron_dsv3.training.wandb_offline import read_history
out = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
first, last = rows[0], rows[-1]
history = read_history(os.path.join(out, "wandb"))
print(f"\n[quickstart] LM loss: iteration {first['iteration']}: {first['train/lm_loss']:.3f} -> "
      f"iteration {last['iteration']}: {last['train/lm_loss']:.3f}")
logged = [r for r in rows if "moe/remote_nodes_per_token" in r][-1]
print(f"[quickstart] expert load max violation (mean over layers): {logged.get('moe/maxvio_mean', float('nan')):.3f}; "
      f"node-limited dispatch: {logged['moe/remote_nodes_per_token']:.2f} inter-node copies per token "
      f"(a flat all-to-all: {logged['moe/remote_experts_per_token']:.2f}), "
      f"{logged.get('moe/dispatch_bytes_cross_node', float('nan')) / 1e6:.2f} MB across nodes per iteration")
print(f"[quickstart] W&B offline run: {len(history)} metrics, e.g. "
      + ", ".join(k for k in ("train/loss", "train/lm_loss", "train/mtp_loss", "train/seq_balance_loss",
                              "perf/tflops_per_device", "moe/maxvio_mean", "moe/load_heatmap/path",
                              "moe/cross_node_share") if k in history))
print(f"""[quickstart] where to look:
  training log      {out}/train.log
  metrics (JSONL)   {out}/metrics.jsonl
  W&B offline run   {out}/wandb   (wandb sync {out}/wandb/wandb/offline-run-*  to upload;
                    python -m megatron_dsv3.training.wandb_offline {out}/wandb  to list it here)
  expert-load map   {out}/checkpoints/expert_load/load_latest.png
  checkpoints       {out}/checkpoints  (resume: same command with --load {out}/checkpoints)
  HF export         {out}/hf""")
if not last["train/lm_loss"] < first["train/lm_loss"] - 0.5:
    sys.exit("[quickstart] FAILED: the LM loss did not fall")
PYEOF
