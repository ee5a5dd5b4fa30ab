#!/usr/bin/env bash
# The proof that one build serves every torch >= 2.11 (issue #15): the cp310-abi3 wheel built here
# against this machine's torch (2.14.1) is installed into a separate venv holding torch==2.11.0 (the
# GPU machine's version) and a CPU subset runs there against the installed wheel, not the source
# tree: tests/test_stable_abi.py (no unstable symbol, every op registered, errors cross the ABI),
# the C++ CPU face of every op under the correctness rule, opcheck and torch.compile, and the Triton
# faces in Triton 3.6's interpreter (torch 2.11's Triton, the GPU machine's).
#   bash scripts/check_torch211.sh [WHEEL]    # default: the newest dist/*.whl, else build_wheel.sh
# The venv is cached outside the checkout, in ~/.cache/mmfast-torch211 (so fresh clones and CI reuse it;
# MMFAST_TORCH211_VENV overrides): the first run
# downloads torch 2.11.0 with its CUDA libraries from PyPI (~4.7 GB, ~5 min here), later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-.venv/bin/python}
VENV=${MMFAST_TORCH211_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mmfast-torch211}
TORCH_VERSION=2.11.0
HF_VERSION=5.17.0
TORCHVISION_VERSION=0.26.0
start=$(date +%s)

whl=${1:-$(ls -t dist/mmfast-*-cp310-abi3-*.whl 2>/dev/null | head -1 || true)}
newer_source=""
# the wheel packs the Python package too: a change there also needs a new wheel
[ -n "$whl" ] && [ -z "${1:-}" ] && newer_source=$(find csrc setup.py mmfast -type f -newer "$whl" -not -path "*/__pycache__*" \
  -not -name "*.so" -not -name "_build_info.json" -print -quit)
if [ -z "$whl" ] || [ -n "$newer_source" ]; then
  echo "[torch211] building the wheel (none in dist/ or sources changed: ${newer_source:-no wheel})"
  whl=$(PYTHON=$PY bash scripts/build_wheel.sh)
fi
case "$whl" in *-cp310-abi3-*.whl) ;; *) echo "[torch211] $whl is not a cp310-abi3 wheel"; exit 1 ;; esac

VPY=$VENV/bin/python
if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[torch211] creating $VENV with torch==$TORCH_VERSION"
  rm -rf "$VENV"
  base=$("$PY" -c "import sys; print(sys._base_executable)")  # not a venv-in-venv
  "$base" -m venv "$VENV"
  "$VPY" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" "numpy<2.4" pytest expecttest 2>&1 \
    | grep -v "^WARNING: Location" || true
fi
# Triton 3.6's interpreter (torch 2.11's Triton) turns size-1 arrays into Python ints, which numpy 2.4
# refuses ("only 0-dimensional arrays can be converted to Python scalars"): keep numpy below 2.4 there.
if ! "$VPY" -c "import numpy, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check "numpy<2.4" 2>&1 | grep -v "^WARNING: Location" || true
fi
# The GPU machine's Hugging Face stack (its image, read 2026-11: transformers 5.17.0, torchvision
# 0.26.0 for torch 2.11, timm), so patching and the model zoo run here under the versions they meet there.
if ! "$VPY" -c "import transformers, timm, sys; sys.exit(transformers.__version__ != '$HF_VERSION')" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check "transformers==$HF_VERSION" "torchvision==$TORCHVISION_VERSION" \
    timm safetensors pillow 2>&1 | grep -v "^WARNING: Location" || true
fi
"$VPY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$whl" 2>&1 \
  | grep -v "^WARNING: Location" || true

# From outside the source tree, so `import mmfast` is the installed wheel.
cd "$(mktemp -d)"
"$VPY" - "$VENV" <<'PY'
import sys, torch, mmfast
from mmfast import _extension
where = mmfast.__file__
assert where.startswith(sys.argv[1]), f"mmfast imported from {where}, not from the venv's installed wheel"
assert _extension.load(), f"the wheel's extension does not load under torch {torch.__version__}: {_extension.load_error()}"
print(f"[torch211] torch {torch.__version__}, Python {sys.version.split()[0]}, mmfast from {where}")
PY
OMP_NUM_THREADS=1 "$VPY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
  "$ROOT/tests/test_stable_abi.py" "$ROOT/tests/test_cross_entropy.py" "$ROOT/tests/test_concat_embed.py" \
  "$ROOT/tests/test_attention.py" \
  -k "test_stable_abi or ((cpu or compile_fullgraph or cpp_checks or bad_inputs) and not triton and not h100 and not sm90)"
# The Triton faces under Triton 3.6 (the GPU machine's), interpreted: catches a language or API
# difference from this machine's Triton before a GPU session pays for it.
# Every op's Triton tests (~70 s).
TRITON_INTERPRET=1 OMP_NUM_THREADS=1 "$VPY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" "$ROOT/tests" \
  -k "triton and not h100 and not sm90"
# Patching of stock Hugging Face / timm models (eager and torch.compile) and the model zoo (~1 min):
# torch 2.11's dynamo refused two things 2.14's accepts (an import from transformers inside a
# compiled forward; binding a signature through function.__get__).
OMP_NUM_THREADS=1 "$VPY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" "$ROOT"/tests/test_patching*.py \
  "$ROOT/tests/test_models.py" -k "not triton"
# The GPU check's CPU dry run (every stage, tiny shapes) under the GPU machine's torch, Triton and
# Hugging Face versions: the scripts a GPU session runs first must not rot on that stack (~50 s).
dry=$(mktemp -d)
if ! OUT="$dry" GPU_CHECK_DRYRUN=1 PYTHON="$VPY" bash "$ROOT/scripts/gpu_check.sh" > "$dry/log.txt" 2>&1; then
  tail -40 "$dry/log.txt"
  echo "[torch211] FAILED: the GPU check's dry run under torch $TORCH_VERSION (log: $dry/log.txt)"
  exit 1
fi
echo "[torch211] GPU check dry run: $(grep -E '^bench rows' "$dry/log.txt")"
# Every Triton kernel configuration compiled for sm_90 by Triton 3.6's own ptxas: its register
# allocation differs from Triton 3.8's (it spilled where 3.8 did not). Cached by source hash in a
# file of its own (a full run prunes entries of other Triton versions).
"$VPY" -m mmfast kernels-report --check --jobs "$(nproc)" \
  --cache "$ROOT/benchmarks/results/static/kernels_cache_triton36.json" >/dev/null
echo "[torch211] passed in $(( $(date +%s) - start )) s"
