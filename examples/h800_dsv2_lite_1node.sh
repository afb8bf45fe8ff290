#!/usr/bin/env bash
# DeepSeek-V2-Lite 16B (15.7B total, 2.4B activated; MLA without q low-rank, 64 experts top-6, softmax
# routing, no MTP) pretraining on ONE H800 node (8 GPUs). Or submit h800_dsv2_lite_1node.sbatch:
#
#   bash examples/h800_dsv2_lite_1node.sh
#   DSV3_PRINT_ARGS=1 bash examples/h800_dsv2_lite_1node.sh     # the dsv3-pretrain flags, one per line
#   dsv3-plan --nodes 1 $(DSV3_PRINT_ARGS=1 bash examples/h800_dsv2_lite_1node.sh)
#
# Layout, flag by flag:
#   --expert-model-parallel-size 8      EP8: 8 of the 64 experts per GPU, all over NVLink (one node)
#   --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
#                                       no TP / PP: the dense part (1.4B) fits every GPU; DP = 8, expert-DP = 1
#   --use-distributed-optimizer         ZeRO-1 over the 8 replicas of the dense part
#   --moe-token-dispatcher-type alltoall
#                                       V2-Lite routes without groups (n_group 1): no node limit to exploit
#   --bf16 --transformer-impl transformer_engine --moe-grouped-gemm
#                                       BF16 on TE layers (add --fp8-format e4m3 --fp8-recipe blockwise for FP8)
#   --recompute-granularity selective --recompute-modules mla_up_proj layernorm
#                                       the report's recomputation (RMSNorm, MLA up-projections)
#   --seq-length 4096 --micro-batch-size 1 --global-batch-size 1024
#                                       128 micro-batches per GPU and step (4M tokens per step)
# dsv3-plan: fits an 80 GB H800 (the planner prints the margin).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NNODES="${NNODES:-1}"
GPUS_PER_NODE=8
DATA="${DATA:-/data/dsv2-lite/corpus_text_document}"
TOKENIZER="${TOKENIZER:-/data/dsv2-lite/tokenizer}"
CKPT="${CKPT:-/checkpoints/dsv2-lite}"

ARGS=(
  --dsv3-preset deepseek-v2-lite
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
  --expert-model-parallel-size 8 --expert-tensor-parallel-size 1 --use-distributed-optimizer
  --moe-token-dispatcher-type alltoall --ranks-per-node "$GPUS_PER_NODE"
  --bf16 --transformer-impl transformer_engine --moe-grouped-gemm
  --recompute-granularity selective --recompute-modules mla_up_proj layernorm
  --seq-length 4096 --micro-batch-size 1 --global-batch-size 1024
  --train-iters 50000 --lr 4.2e-4 --min-lr 4.2e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --init-method-std 0.006
  --moe-router-bias-update-rate 0.0 --moe-aux-loss-coeff 0.001
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" --data-path "$DATA" --split 99,1,0
  --eval-interval 1000 --eval-iters 10 --log-interval 10
  --save "$CKPT" --load "$CKPT" --save-interval 1000
)

if [ -n "${DSV3_PRINT_ARGS:-}" ]; then printf '%s\n' "${ARGS[@]}"; exit 0; fi
if [ -n "${DSV3_PRINT_NODES:-}" ]; then echo "$NNODES"; exit 0; fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
cd "$ROOT"
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "${NODE_RANK:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-dsv2-lite}" \
  -m megatron_dsv3.pretrain "${ARGS[@]}"
