#!/bin/bash
# The GPU measurements of issue 15 (item 4) in one script: run on a machine with a CUDA GPU from the
# repository root, after `make install`. Writes JSON lines to bench/results/gpu_<host>.jsonl.
#   bench/gpu_checks.sh            # about 10 minutes on one recent GPU
set -euo pipefail
PY=${PY:-.venv/bin/python}
SELFTRAIN=${SELFTRAIN:-.venv/bin/selftrain}
OUT=bench/results/gpu_$(hostname -s).jsonl
RUN=${RUN:-runs/fm}
mkdir -p bench/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT.device"
# the teacher the pseudo-label bench reads (the demo config's teacher stage; AMP bf16 and channels_last are the defaults on GPU)
"$SELFTRAIN" run configs/fashion_mnist.yaml --run-dir "$RUN" --only data
"$SELFTRAIN" run configs/fashion_mnist.yaml --run-dir "$RUN" --only teacher --set runtime.workers=8
# pseudo-label efficiency: end to end / bare forward, bf16, several loader worker counts
$PY bench/bench_pseudo_label.py --device cuda --precision bf16 --data "$RUN/data" --teacher "$RUN/teacher/checkpoint" \
    --shards 8 --batch 1000 --workers 2 4 8 | tee -a "$OUT"
# training images/s with the real S4 loader vs pre-made batches, and the share of step time waiting for data
$PY bench/bench_input_pipeline.py --device cuda --precision bf16 --data "$RUN/data" --policy s1 s4 --batch 256 \
    --workers 2 4 8 --steps 50 --warmup 10 | tee -a "$OUT"
# the same with torch.compile (inductor)
$PY bench/bench_input_pipeline.py --device cuda --precision bf16 --compile --data "$RUN/data" --policy s4 --batch 256 \
    --workers 8 --steps 50 --warmup 20 | tee -a "$OUT"
echo "results: $OUT"
