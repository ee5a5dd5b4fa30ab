#!/usr/bin/env bash
# The one-command GPU check (run it whenever a GPU machine is available; ≤ 10 min on an H100 box
# with 16 cores):
#   1. build mmfast with all cores (CUDA sources for this GPU's arch),
#   2. the whole test suite, `cuda` tests included,
#   3. compute-sanitizer memcheck over the CUDA op tests, racecheck over the attention kernels,
#   4. the benchmarks (pytest-benchmark JSON),
#   5. benchmarks/report.py: Markdown table + plots + the verified-kernel table for backend="auto".
# Results go to $OUT when set (the device tool brings that folder back), else to
# benchmarks/results/<device>/; commit them. A summary table is printed last.
# Offline machines: MMFAST_OFFLINE=1 (default here) installs only wheels carried in .wheels/.
set -uo pipefail
cd "$(dirname "$0")/.."
export MMFAST_OFFLINE=${MMFAST_OFFLINE:-1}
export HF_HUB_OFFLINE=1
DEST=${OUT:-benchmarks/results/latest}
mkdir -p "$DEST"
LOG="$DEST/logs.txt"
: > "$LOG"
t0=$(date +%s)
stage() { echo "=== $1 ($(( $(date +%s) - t0 )) s)" | tee -a "$LOG"; }

stage "build"
# Only this GPU's arch: a second arch doubles nvcc time inside the 10-minute budget.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  export TORCH_CUDA_ARCH_LIST
fi
MAX_JOBS=$(nproc) bash scripts/setup.sh >> "$LOG" 2>&1 || { tail -40 "$LOG"; echo "BUILD FAILED"; exit 1; }
PY=.venv/bin/python
$PY -m mmfast info --json > "$DEST/info.json" 2>> "$LOG"
$PY -m mmfast info | tee -a "$LOG"

stage "tests (all, cuda included)"
xdist=(); $PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
timeout 240 $PY -m pytest tests -q "${xdist[@]}" --junitxml="$DEST/tests.xml" >> "$LOG" 2>&1
tests_rc=$?
tail -5 "$LOG"

stage "compute-sanitizer"
san_rc=skipped
if command -v compute-sanitizer >/dev/null; then
  # Only the GPU op tests: the sanitizer slows kernels ~100x.
  timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
    $PY -m pytest tests -q -m cuda -x -k "cross_entropy or concat_embed or attention" -p no:xdist >> "$LOG" 2>&1
  san_rc=$?
  timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 --target-processes all \
    $PY -m pytest tests -q -m cuda -x -k "attention and not dropout" -p no:xdist >> "$LOG" 2>&1
  rc2=$?; [ "$san_rc" = 0 ] && san_rc=$rc2
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG" | tail -4
fi

stage "benchmarks"
timeout 240 $PY -m pytest benchmarks -q -p no:xdist --benchmark-json="$DEST/bench.json" >> "$LOG" 2>&1
bench_rc=$?

stage "report"
$PY benchmarks/report.py "$DEST/bench.json" --junit "$DEST/tests.xml" --out "$DEST" >> "$LOG" 2>&1
cat "$DEST/summary.txt" 2>/dev/null
echo "tests rc=$tests_rc  sanitizer rc=$san_rc  benchmarks rc=$bench_rc  total $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
