#!/usr/bin/env bash
# Main CPU job for now (the training quickstart arrives with the launcher): set up .venv/ on a fresh
# machine, then load a DSv3 HF checkpoint on 1 and on 4 gloo ranks (TP2 x EP2) and compare logits.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
TORCHDYNAMO_DISABLE=1 MEGATRON_DSV3_CPU=1 exec .venv/bin/python -W ignore examples/hf_tp_ep_cpu.py "$@"
