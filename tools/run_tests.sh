#!/usr/bin/env bash
# The test command: sets up .venv/ on a fresh machine (CPU torch, Megatron-Core 0.19.2), then runs
# every test on CPU with gloo. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MEGATRON_DSV3_CPU=1
exec .venv/bin/python -m pytest -q -p no:warnings -p no:cacheprovider tests "$@"
