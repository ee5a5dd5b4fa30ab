#!/usr/bin/env bash
# The full test suite from nothing: set-up (venv, torch, build), then pytest.
# Triton kernels run through the interpreter on CPU-only machines (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${MMFAST_TEST_WORKERS:-$(nproc)}
xdist=()
if .venv/bin/python -c "import xdist" 2>/dev/null; then xdist=(-n "$workers"); fi
.venv/bin/python -m pytest tests -q "${xdist[@]}" --durations=15 "$@"
# The benchmark suites in smoke mode (tiny shapes): every case checks its result under the
# correctness rule, then is timed once. In a call of their own without xdist, which would switch
# pytest-benchmark off ("Benchmarks are automatically disabled because xdist plugin is active").
exec .venv/bin/python -m pytest benchmarks -q -p no:xdist --durations=5
