#!/usr/bin/env bash
# A mid-size DeepSeek-V3-style model (24 layers, hidden 4096, 128 experts top-8 in 4 node groups keep 2,
# MLA, MTP depth 1; ~60B total, ~5B activated) on 8 H800 nodes = 64 GPUs, with the report's machinery:
# DualPipeV, node-limited dispatch, FP8 blockwise, ZeRO-1. Or submit h800_dsv3_mid_8nodes.sbatch:
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> bash examples/h800_dsv3_mid_8nodes.sh
#   DSV3_PRINT_ARGS=1 bash examples/h800_dsv3_mid_8nodes.sh     # the dsv3-pretrain flags, one per line
#   dsv3-plan --nodes 8 $(DSV3_PRINT_ARGS=1 bash examples/h800_dsv3_mid_8nodes.sh)
#
# Layout, flag by flag:
#   --dsv3-preset deepseek-v3 --num-layers 24 --hidden-size 4096 --ffn-hidden-size 11264
#   --num-attention-heads 32 --num-experts 128 --moe-ffn-hidden-size 1536 --first-k-dense-replace 1
#   --moe-router-num-groups 4 --moe-router-group-topk 2
#                                       the 671B architecture scaled down; the routing groups are the 4 nodes an
#                                       EP group spans, M = 2 nodes per token
#   --pipeline-model-parallel-size 2 --pipeline-schedule dualpipev
#                                       DualPipeV: 4 stages of 6 layers in a V over 2 ranks, one parameter copy
#   --expert-model-parallel-size 32     EP32 over 4 nodes: 4 experts per GPU; DP = 64 / 2 = 32, expert-DP = 1
#   --use-distributed-optimizer         ZeRO-1 over the 32 replicas of the dense part
#   --moe-token-dispatcher-type node_limited --ranks-per-node 8 --moe-dispatch-fp8
#                                       a token crosses IB at most once per node it needs (at most 2 nodes)
#   --bf16 --fp8-format e4m3 --fp8-recipe blockwise --transformer-impl transformer_engine --moe-grouped-gemm
#   --activation-func-fp8-input-store   the report's FP8 recipe (Figure 6), SwiGLU input cached in FP8
#   --recompute-granularity selective --recompute-modules mla_up_proj layernorm moe_act
#                                       the report's recomputation
#   --seq-length 4096 --micro-batch-size 1 --global-batch-size 2048
#                                       64 micro-batches per step (DualPipeV needs >= 2 x PP = 4)
# dsv3-plan: fits an 80 GB H800 (the planner prints the margin).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NNODES="${NNODES:-8}"
GPUS_PER_NODE=8
DATA="${DATA:-/data/dsv3/corpus_text_document}"
TOKENIZER="${TOKENIZER:-/data/dsv3/tokenizer}"
CKPT="${CKPT:-/checkpoints/dsv3-mid}"

ARGS=(
  --dsv3-preset deepseek-v3 --num-layers 24 --hidden-size 4096 --ffn-hidden-size 11264 --num-attention-heads 32
  --num-experts 128 --moe-ffn-hidden-size 1536 --first-k-dense-replace 1
  --moe-router-num-groups 4 --moe-router-group-topk 2
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --pipeline-schedule dualpipev
  --expert-model-parallel-size 32 --expert-tensor-parallel-size 1 --use-distributed-optimizer
  --moe-token-dispatcher-type node_limited --ranks-per-node "$GPUS_PER_NODE" --moe-dispatch-fp8
  --bf16 --fp8-format e4m3 --fp8-recipe blockwise --transformer-impl transformer_engine --moe-grouped-gemm
  --activation-func-fp8-input-store
  --recompute-granularity selective --recompute-modules mla_up_proj layernorm moe_act
  --seq-length 4096 --micro-batch-size 1 --global-batch-size 2048
  --train-iters 100000 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" --data-path "$DATA" --split 99,1,0
  --eval-interval 1000 --eval-iters 10 --log-interval 10
  --save "$CKPT" --load "$CKPT" --save-interval 1000
)

if [ -n "${DSV3_PRINT_ARGS:-}" ]; then printf '%s\n' "${ARGS[@]}"; exit 0; fi
if [ -n "${DSV3_PRINT_NODES:-}" ]; then echo "$NNODES"; exit 0; fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
cd "$ROOT"
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "${NODE_RANK:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-dsv3-mid}" \
  -m megatron_dsv3.pretrain "${ARGS[@]}"
