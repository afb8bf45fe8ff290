#!/usr/bin/env bash
# DeepSeek-V3's two context-extension phases (report sec. 4.3) after 4K pretraining with plain RoPE
# (the deepseek-v3 preset): YaRN on the decoupled RoPE key (s = 40, alpha = 1, beta = 32,
# sqrt(t) = 0.1 ln s + 1), 1000 steps each at LR 7.3e-6; phase 1 at 32K tokens per sequence with
# batch 1920, phase 2 at 128K with batch 480. Each phase starts from the previous checkpoint with
# --finetune (weights only: a fresh optimizer, LR schedule and iteration count).
#
#   CKPT_4K=/ckpt/pretrain DATA=/data/corpus_text_document TOKENIZER=/data/tokenizer \
#   LAUNCH="torchrun --nnodes 256 --nproc-per-node 8 ..." bash examples/context_extension.sh <layout flags>
#
# The layout flags (TP/PP/EP, --pipeline-schedule, --bf16, ...) are passed through. gamma is 0 (the
# report's value at the end of pretraining); MTP lambda 0.1 (its value for the last 4.8T tokens).
set -euo pipefail
: "${CKPT_4K:?set CKPT_4K to the 4K pretraining checkpoint}" "${DATA:?set DATA}" "${TOKENIZER:?set TOKENIZER}"
OUT="${OUT:-ckpt_context_extension}"
LAUNCH="${LAUNCH:-torchrun --nproc-per-node 8}"
YARN=(--rope-type yarn --rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0
      --yarn-original-max-position-embeddings 4096 --yarn-beta-fast 32 --yarn-beta-slow 1)
COMMON=(--dsv3-preset deepseek-v3 "${YARN[@]}" --data-path "$DATA" --tokenizer-type HuggingFaceTokenizer
        --tokenizer-model "$TOKENIZER" --train-iters 1000 --lr 7.3e-6 --min-lr 7.3e-6 --lr-decay-style constant
        --lr-warmup-iters 0 --moe-router-bias-update-rate 0 --mtp-loss-scaling-factor 0.1 --finetune
        --save-interval 250)
$LAUNCH -m megatron_dsv3.pretrain "${COMMON[@]}" --seq-length 32768 --max-position-embeddings 32768 \
  --global-batch-size 1920 --load "$CKPT_4K" --save "$OUT/32k" "$@"
$LAUNCH -m megatron_dsv3.pretrain "${COMMON[@]}" --seq-length 131072 --max-position-embeddings 131072 \
  --global-batch-size 480 --load "$OUT/32k" --save "$OUT/128k" "$@"
