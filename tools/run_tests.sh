#!/usr/bin/env bash
# The test command: sets up .venv/ on a fresh machine (CPU torch, Megatron-Core 0.19.2), then runs
# every test on CPU with gloo. Extra arguments go to pytest. Two pytest workers, a test file each at a
# time (module fixtures are shared within a file): half the tests launch one rank, which leaves a
# core idle on a 2-core machine. DSV3_TEST_WORKERS=0 runs them in this process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MEGATRON_DSV3_CPU=1
WORKERS="${DSV3_TEST_WORKERS:-2}"
XDIST=()
[ "$WORKERS" != "0" ] && XDIST=(-n "$WORKERS" --dist loadfile)
exec .venv/bin/python -m pytest -q -p no:warnings -p no:cacheprovider "${XDIST[@]}" tests "$@"
