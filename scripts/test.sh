#!/usr/bin/env bash
# The full test suite from nothing: set-up (venv, torch, build), then pytest.
# Triton kernels run through the interpreter on CPU-only machines (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${MMFAST_TEST_WORKERS:-$(nproc)}
exec .venv/bin/python -m pytest tests -q -n "$workers" --durations=15 "$@"
