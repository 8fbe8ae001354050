#!/bin/bash
# The GPU checks in one script, from the repository root on a machine with a CUDA GPU:
#   1. the whole pipeline on the GPU, every stage (`--preset quick`: teacher, round 1, distillation, export);
#   2. issue 15's figures, on the full import (its teacher: step 1's, same architecture): pseudo-label efficiency
#      (end to end / bare forward, bf16, 2/4/8 loader workers), training images/s with the real S1/S4 loader vs
#      pre-made batches and the share of step time waiting for data, and the same with torch.compile (inductor);
#      the trainer's overhead against a hand-written loop;
#   3. with FULL=1, before the compiled bench, the demo config (make demo's run) on the GPU, its report with per-stage
#      wall times.
# Each step runs under its own time limit and a failed step does not stop the next; once BUDGET_S seconds have
# passed the remaining steps are skipped. JSON lines go to RESULTS/gpu_<host>.jsonl, every step's output to
# RESULTS/gpu_<host>.log, the runs' reports to RESULTS/gpu_<host>_{quick,full}_report.md.
#   bench/gpu_checks.sh                         # after make install; its step limits add up to 11 minutes (FULL=1: + the
#                                               # demo), BUDGET_S=500 keeps the whole under a 10-minute slot
# Environment (defaults in brackets): PY [.venv/bin/python], SELFTRAIN [.venv/bin/selftrain] (a command line, e.g.
# "python3 -m pipeline.cli" where python3 already has the dependencies), RESULTS [bench/results], RUN [runs/gpu],
# FMNIST_DIR (the raw Fashion-MNIST files, when not in /usr/share/datasets/fashion-mnist), WORKERS [8] (loader
# workers), DEVICE [cuda], PRECISION [bf16], FULL [0], BUDGET_S [no limit], EXTRA_SET (more --set overrides
# for both runs, e.g. to try the script on a CPU with a short schedule).
set -uo pipefail
PY=${PY:-.venv/bin/python}
read -r -a SELFTRAIN <<< "${SELFTRAIN:-.venv/bin/selftrain}"
RESULTS=${RESULTS:-bench/results}
RUN=${RUN:-runs/gpu}
WORKERS=${WORKERS:-8}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
BUDGET_S=${BUDGET_S:-1000000}
HOST=$(hostname -s)
OUT=$RESULTS/gpu_$HOST.jsonl
LOG=$RESULTS/gpu_$HOST.log
mkdir -p "$RESULTS"
SETS=(--set "runtime.workers=$WORKERS" --set runtime.progress=false)
[ -n "${FMNIST_DIR:-}" ] && SETS+=(--set "data.path=$FMNIST_DIR")
read -r -a EXTRA <<< "${EXTRA_SET:-}"  # split on spaces, no filename matching (a value like [1] stays as it is)
for override in "${EXTRA[@]}"; do SETS+=(--set "$override"); done
FAILED=()

step() {  # step NAME LIMIT_S COMMAND...: run COMMAND under a time limit; log it; keep its JSON lines
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if (( BUDGET_S - SECONDS < 30 )); then
    echo "== $name: skipped, budget spent" | tee -a "$LOG"; FAILED+=("$name (skipped)"); return
  fi
  (( limit > BUDGET_S - SECONDS )) && limit=$(( BUDGET_S - SECONDS ))
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout -k 20 "$limit" "$@" > "$LOG.step" 2>&1
  rc=$?
  [ "$rc" = 0 ] || FAILED+=("$name")
  cat "$LOG.step" >> "$LOG"
  grep '^{' "$LOG.step" | tee -a "$OUT"
  [ "$rc" = 0 ] || tail -n 15 "$LOG.step"
  echo "== $name: exit $rc after $(( SECONDS - start )) s" | tee -a "$LOG"
  rm -f "$LOG.step"
}

report() {  # report RUN_DIR NAME: keep the run's report (per-stage wall times, the deployment table), and print
  # each finished stage's wall time, top-1 and training images/s (also when the run was cut short)
  [ -f "$1/report/report.md" ] && cp "$1/report/report.md" "$RESULTS/gpu_${HOST}_$2_report.md"
  "$PY" - "$1" "$2" <<'SUMMARY' | tee -a "$OUT"
import json, sys
from pathlib import Path
run, name = Path(sys.argv[1]), sys.argv[2]
for wall in sorted(run.glob("*/wall_time.json"), key=lambda p: p.stat().st_mtime):
    metrics = wall.parent / "metrics.json"
    m = json.loads(metrics.read_text()) if metrics.exists() else {}
    print(json.dumps({"run": name, "stage": wall.parent.name, "seconds": json.loads(wall.read_text())["seconds"],
                      "done": (wall.parent / "DONE").exists(), "top1": m.get("top1"),
                      "train_images_per_s": m.get("train_images_per_s")}))
SUMMARY
}

for dir in "$RUN-quick" "$RUN"; do  # a finished stage left by an earlier invocation would be skipped, its figures old
  if [ -e "$dir" ]; then echo "gpu_checks.sh: $dir exists; remove it or pass another RUN (nothing was changed)" >&2; exit 2; fi
done
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
  nvidia-smi dmon -s u -d 5 > "$RESULTS/gpu_${HOST}_dmon.txt" 2>&1 &
  DMON=$!
  trap 'kill "$DMON" 2>/dev/null' EXIT
fi
"$PY" -c "import torch, timm, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'onnxruntime', onnxruntime.__version__)" | tee -a "$LOG"

step pipeline_quick 240 "${SELFTRAIN[@]}" run configs/fashion_mnist.yaml --run-dir "$RUN-quick" --preset quick "${SETS[@]}"
report "$RUN-quick" quick
step import_full 60 "${SELFTRAIN[@]}" run configs/fashion_mnist.yaml --run-dir "$RUN" --only data "${SETS[@]}"
step pseudo_label 60 "$PY" bench/bench_pseudo_label.py --device "$DEVICE" --precision "$PRECISION" --data "$RUN/data" \
    --teacher "$RUN-quick/teacher/checkpoint" --shards 8 --batch 1000 --workers 2 4 8
step input_pipeline 100 "$PY" bench/bench_input_pipeline.py --device "$DEVICE" --precision "$PRECISION" \
    --data "$RUN/data" --policy s1 s4 --batch 256 --workers 2 4 8 --steps 30 --warmup 10 --reps 2
step trainer_overhead 60 "$PY" bench/bench_trainer_overhead.py --device "$DEVICE" --precision "$PRECISION" \
    --data "$RUN/data" --batch 256 --steps 120 --reps 3
if [ "${FULL:-0}" = 1 ]; then
  step pipeline_full 3600 "${SELFTRAIN[@]}" run configs/fashion_mnist.yaml --run-dir "$RUN" "${SETS[@]}"
  report "$RUN" full
fi
step input_pipeline_compiled 120 "$PY" bench/bench_input_pipeline.py --device "$DEVICE" --precision "$PRECISION" \
    --compile --data "$RUN/data" --policy s4 --batch 256 --workers 8 --steps 50 --warmup 20 --reps 2
echo "results: $OUT $LOG"
if [ "${#FAILED[@]}" -gt 0 ]; then echo "failed or cut short: ${FAILED[*]}"; exit 1; fi
