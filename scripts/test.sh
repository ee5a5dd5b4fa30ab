#!/usr/bin/env bash
# The full test suite from nothing: set-up (venv, torch, build), then pytest.
# Triton kernels run through the interpreter on CPU-only machines (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${MMFAST_TEST_WORKERS:-$(nproc)}
xdist=()
if .venv/bin/python -c "import xdist" 2>/dev/null; then xdist=(-n "$workers"); fi
# tests/ and the benchmark suites in smoke mode (tiny shapes, one round) so they never rot
exec .venv/bin/python -m pytest tests benchmarks -q "${xdist[@]}" --durations=15 "$@"
