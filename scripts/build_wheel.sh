#!/usr/bin/env bash
# Builds the binary wheel dist/mmfast-<version>-cp310-abi3-<platform>.whl: the C++ CPU kernels and,
# by default, the CUDA kernels for sm_80 and sm_90 plus PTX for newer GPUs, all on the LibTorch
# stable ABI (torch >= 2.11) and the Python limited API (CPython >= 3.10). No compiler is needed
# to install it. Knobs: MMFAST_BUILD_CUDA (default 1 here: a wheel without CUDA kernels must be
# asked for with 0), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS, PYTHON (the
# interpreter whose torch the build uses; default .venv/bin/python).
#   bash scripts/build_wheel.sh            # -> dist/mmfast-0.1.0-cp310-abi3-linux_x86_64.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export MMFAST_BUILD_CUDA=${MMFAST_BUILD_CUDA:-1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "[wheel] MMFAST_BUILD_CUDA=$MMFAST_BUILD_CUDA TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" >&2
start=$(date +%s)
mkdir -p dist
# --no-build-isolation: build against the torch already installed (isolation would download another).
# The objects in build/temp.* are shared with in-place builds; ninja recompiles a file whose flags
# differ. build/lib.* is what the wheel packs: cleared, so an extension left there by an older
# non-abi3 build (which Python would import before _C.abi3.so) cannot ride along.
rm -rf build/lib.*
# setup.py records what it builds in mmfast/_build_info.json, in the source tree: put back the
# in-place build's record afterwards, else `mmfast info` there reports the wheel's CUDA kernels.
info=mmfast/_build_info.json
if [ -f "$info" ]; then cp "$info" "$info.in-place"; trap 'mv -f "$info.in-place" "$info"' EXIT; fi
"$PY" -m pip wheel . --no-build-isolation --no-deps -w dist 2>&1 | grep -v "^WARNING: Location" >&2 || true
whl=$(ls -t dist/mmfast-*-cp310-abi3-*.whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ] || [ "$(stat -c %Y "$whl")" -lt "$start" ]; then
  echo "[wheel] FAILED: no new cp310-abi3 wheel in dist/" >&2
  exit 1
fi
stray=$("$PY" -c "import sys, zipfile; print(' '.join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith('.so') and not n.endswith('.abi3.so')))" "$whl")
if [ -n "$stray" ]; then
  echo "[wheel] FAILED: $whl holds extension modules that are not abi3: $stray" >&2
  exit 1
fi
echo "[wheel] $whl: $(du -h "$whl" | cut -f1), built in $(( $(date +%s) - start )) s on $(nproc) cores" >&2
echo "$whl"
