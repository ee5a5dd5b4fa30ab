#!/usr/bin/env bash
# Incremental in-place rebuild of mmfast._C for development (ninja recompiles changed files only).
# Serialised with a lock so that several people/agents on one machine never run two builds in
# one build folder at once. Check a new file alone first: scripts/compile_one.py FILE
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/mmfast-build.lock env MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  .venv/bin/python setup.py -q build_ext --inplace
