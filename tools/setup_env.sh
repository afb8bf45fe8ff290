#!/usr/bin/env bash
# Creates .venv/ at the repository root with everything megatron-dsv3 needs on a CPU machine
# (Python 3.11, no GPU). Safe to re-run: finished steps are skipped by pip.
#
#   bash tools/setup_env.sh            # runtime + test dependencies
#
# Order matters (see ../shared/megatron-core-cpu.md):
#  1. CPU torch 2.13.0 first, pinned, so that nothing later resolves a CUDA build of torch.
#  2. numpy / packaging / psutil before megatron-core, whose wheel is installed with --no-deps
#     --ignore-requires-python (it declares Python >= 3.12 but its cp311 wheel works).
#  3. triton: `import megatron.core` 0.19.2 imports it unconditionally.
#  4. this package in editable mode without dependency resolution (deps are already here), then
#     the test-only dependencies (pytest, pytest-xdist: the tests run in 2 processes, a file each).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MCORE_VERSION="0.19.2"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ -f "$VENV/.dsv3-setup-ok" ] && [ "$(cat "$VENV/.dsv3-setup-ok")" = "$(sha1sum "$ROOT/tools/setup_env.sh" "$ROOT/pyproject.toml" | sha1sum)" ]; then
  exit 0
fi
# A constraint file keeps every later step from replacing the CPU torch.
CONSTRAINTS="$VENV/dsv3-constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"

echo "[setup] torch==$TORCH_VERSION (CPU build)"
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  if ls /opt/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
    "${PIP[@]}" install --find-links /opt/wheels "torch==$TORCH_VERSION"      # the CPU wheel on disk
  else
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VENV/bin/python" - <<PYEOF
import torch, sys
if torch.version.cuda is not None:
    sys.exit(f"[setup] refusing: torch {torch.__version__} is a CUDA build (cuda {torch.version.cuda}); "
             "remove $VENV and install the CPU build of torch $TORCH_VERSION first")
PYEOF

echo "[setup] megatron-core==$MCORE_VERSION and its dependencies"
"${PIP[@]}" install "numpy<2.4" "packaging>=24.2" psutil einops "triton==3.9.0" typing_extensions
"${PIP[@]}" install --no-deps --ignore-requires-python "megatron-core==$MCORE_VERSION"

echo "[setup] megatron-dsv3 (editable) and runtime dependencies"
"${PIP[@]}" install safetensors wandb datasets tqdm regex sentencepiece pillow "transformers>=4.57" tokenizers
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null || "${PIP[@]}" install --no-deps -e "$ROOT"

echo "[setup] test dependencies"
"${PIP[@]}" install pytest pytest-xdist

"$VENV/bin/python" -c "import megatron.core, megatron_dsv3, torch; print('[setup] ok: torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
sha1sum "$ROOT/tools/setup_env.sh" "$ROOT/pyproject.toml" | sha1sum > "$VENV/.dsv3-setup-ok"
