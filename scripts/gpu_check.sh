#!/usr/bin/env bash
# The staged GPU check: evidence that fits a short GPU lease (one run of <= 8 minutes).
#
#   S0 env        env.json       nvidia-smi, versions, which tools exist
#   S1 build      build.log      a carried prebuilt wheel (.wheels/mmfast-*.whl) if its mmfast._C loads and
#                                has CUDA kernels, else an in-place ninja build for this GPU's arch only
#   S2 smoke      smoke.jsonl    every op x face (cuda, triton) x dtype on real-model shapes, forward and
#                                backward against float64 under the rule; dropout repeatable, fwd/bwd masks equal
#   S3 sanitizer  sanitizer.txt  compute-sanitizer memcheck, racecheck, synccheck over the CUDA face, tiny shapes
#   S4 bench      bench.jsonl    CUDA-event micro-benchmarks (no pytest-benchmark, no torch.compile, no autotuning)
#   S5 tests      tests.xml      pytest tests -m cuda with the time that remains
#   report        report.md, plot.png, summary.txt, kernel_table.json; a short table printed last
#
# Every stage writes its files before the next starts and is stopped at its deadline with SIGINT
# (`timeout -s INT -k 15`), so what it measured so far is still written; a stage that leaves no
# file gets a placeholder that says why. Total budget MMFAST_GPU_BUDGET_S (default 480 s).
#
# Results: $OUT when set (the device tool brings back at most 8 files: the archive gpu_check.tgz of
# all stage files, refreshed after every stage, plus copies of the main ones), else
# benchmarks/results/latest/. GPU_CHECK_DRYRUN=1 runs every stage on the CPU (Triton interpreter,
# tiny shapes; what needs CUDA says "skipped: no GPU"), so CI keeps this script from rotting.
# MMFAST_GPU_DEADLINES="S2=30,S4=10" overrides stage deadlines (seconds; tests use it).
# MMFAST_GPU_FACES=cuda (or triton) narrows S2, S4 and S5 to those faces (default: cuda,triton).
set -uo pipefail
cd "$(dirname "$0")/.."
for face in ${MMFAST_GPU_FACES:+${MMFAST_GPU_FACES//,/ }}; do
  case $face in cuda|triton) ;; *)
    echo "gpu_check.sh: MMFAST_GPU_FACES must name cuda and/or triton, comma-separated; got '${MMFAST_GPU_FACES}'" >&2
    exit 2 ;;
  esac
done
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRYRUN:-0}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BUDGET=${MMFAST_GPU_BUDGET_S:-220}
else
  BUDGET=${MMFAST_GPU_BUDGET_S:-480}
fi
if [ -n "${OUT:-}" ]; then
  DEST=$OUT
  STAGES=${MMFAST_GPU_STAGE_DIR:-$(mktemp -d /tmp/mmfast_gpu_check.XXXXXX)/stages}
else
  DEST=benchmarks/results/latest
  STAGES=$DEST
fi
mkdir -p "$DEST" "$STAGES"
STAGES=$(cd "$STAGES" && pwd)
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }

# Stage plan: name, share of the budget (percent), floor reserved for it (s), the file it must leave.
# A stage that ends early leaves its time to S5 (tests), the stage that can always use more.
NAMES=(S0 S1 S2 S3 S4 S5 report)
if [ "$DRY" = 1 ]; then
  SHARE=(10 8 35 5 30 100 100)
  FLOOR=(10 10 20 5 20 15 25)
else  # a build from source needs ~70-150 s on 16 cores; with the carried wheel S1 takes seconds
  SHARE=(5 31 25 14 21 100 100)
  FLOOR=(10 10 30 10 30 20 25)
fi
FILES=(env.json build.log smoke.jsonl sanitizer.txt bench.jsonl tests.xml report.md)
override() {  # deadline override from MMFAST_GPU_DEADLINES for stage $1, else empty
  local kv IFS=', '
  for kv in ${MMFAST_GPU_DEADLINES:-}; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done
}
deadline() {  # seconds stage $1 (index) may run: its share, leaving the floors of later stages
  local i=$1 reserve=0 j left d o
  for (( j = i + 1; j < ${#NAMES[@]}; j++ )); do reserve=$(( reserve + FLOOR[j] )); done
  left=$(( BUDGET - $(elapsed) - reserve ))
  d=$(( BUDGET * SHARE[i] / 100 ))
  (( d > left )) && d=$left
  (( d < FLOOR[i] )) && d=${FLOOR[i]}
  o=$(override "${NAMES[$i]}")
  [ -n "$o" ] && d=$o
  echo "$d"
}
publish() {  # archive every stage file; with $OUT, also copy the main files (<= 8 files in all)
  tar czf "$DEST/gpu_check.tgz.part" -C "$(dirname "$STAGES")" "$(basename "$STAGES")" && \
    mv "$DEST/gpu_check.tgz.part" "$DEST/gpu_check.tgz"
  if [ "$DEST" != "$STAGES" ]; then
    local f
    for f in report.md summary.txt env.json smoke.jsonl bench.jsonl tests.xml plot.png; do
      [ -f "$STAGES/$f" ] && cp "$STAGES/$f" "$DEST/$f"
    done
  fi
}

echo "[gpu_check] budget ${BUDGET} s, dry run: $DRY, stage files: $STAGES, results: $DEST"
: > "$STAGES/stages.jsonl"
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  d=$(deadline "$i")
  s=$(date +%s)
  echo "=== $name (deadline ${d} s, at $(elapsed) s)"
  timeout -s INT -k 15 "$d" "$PY" scripts/gpu_check.py "$name" --dir "$STAGES" --deadline "$d" \
    2>&1 | tee -a "$STAGES/log.txt"
  rc=${PIPESTATUS[0]}
  secs=$(( $(date +%s) - s ))
  killed=false; { [ "$rc" = 124 ] || [ "$rc" = 137 ] || [ "$rc" = 130 ]; } && killed=true
  "$PY" scripts/gpu_check.py finish "$name" --dir "$STAGES" --rc "$rc" --seconds "$secs" \
    --deadline "$d" --killed "$killed" --file "${FILES[$i]}"
  publish
  [ -f "$STAGES/env.sh" ] && . "$STAGES/env.sh"  # S1: carried wheels unpacked for the later stages
done
echo "[gpu_check] total $(elapsed) s; files: $DEST"
[ -f "$STAGES/summary.txt" ] && cat "$STAGES/summary.txt"
# On a GPU every outcome is evidence (exit 0); the dry run fails when the script itself rotted.
[ "$DRY" = 1 ] && exec "$PY" scripts/gpu_check.py verdict --dir "$STAGES"
exit 0
