"""Online distillation runs its teacher in the student's mixed precision (bf16/fp16 autocast): what does
that cost the teacher, and what does it save? One checkpoint on the view distillation feeds it (the test
images' eval view at the student's SIZE px, resized by the distill stage's own `TeacherView`), once in
fp32 and once under CPU bf16 autocast: top-1 of each, how often the two agree, the largest logit
difference, and the median time of a batch, both precisions interleaved in one process.

On a CPU without native bf16 (no AVX512-BF16 / AMX) the bf16 time is emulation and says nothing about a
GPU; the accuracy columns hold on any machine (the same number format). Prints one JSON line:
  python bench/bench_teacher_precision.py runs/hold-z4 student_r1 --view-from 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment import build_eval_transform  # noqa: E402
from pipeline.config.loading import load_config  # noqa: E402
from pipeline.data.imageset import load_labeled_split, open_data  # noqa: E402
from pipeline.data.loader import eval_batches  # noqa: E402
from pipeline.engine.predict import load_model  # noqa: E402
from pipeline.stages.runner import make_run_dir  # noqa: E402
from students.kd_teacher import TeacherView  # noqa: E402


def logits_and_seconds(teacher: TeacherView, views: list[torch.Tensor], bf16: bool) -> tuple[torch.Tensor, list[float]]:
    rows, seconds = [], []
    for view in views:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            rows.append(teacher(view))
        seconds.append(time.perf_counter() - start)
    return torch.cat(rows), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("stage", help="a stage with a checkpoint, e.g. student_r1")
    parser.add_argument("--view-from", type=int, default=64, metavar="SIZE", help="the student's input size")
    parser.add_argument("--batch", type=int, default=256, help="images a batch (distillation's step is 256)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of fp32 and bf16")
    args = parser.parse_args()
    checkpoint = args.run_dir / args.stage / "checkpoint"
    if not checkpoint.is_dir():
        raise SystemExit(f"no checkpoint at {checkpoint}")
    data = open_data(make_run_dir(load_config(args.run_dir / "config.yaml"), args.run_dir).data_dir)
    test = load_labeled_split(data, "test")
    model, meta = load_model(checkpoint, data.num_classes)
    teacher = TeacherView(model, meta, torch.device("cpu"), channels_last=True)
    views = [batch.images.float().div_(255.0)
             for batch in eval_batches(test.images, build_eval_transform(args.view_from), args.batch, 0)]
    labels = torch.as_tensor(test.labels)
    logits: dict[bool, torch.Tensor] = {}
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for bf16 in (False, True):
                logits[bf16], seconds = logits_and_seconds(teacher, views, bf16)
                times[bf16] += seconds
    fp32, bf16 = logits[False], logits[True]
    ms = {name: round(statistics.median(times[bf16]) * 1000, 1) for name, bf16 in (("fp32", False), ("bf16", True))}
    print(json.dumps({
        "checkpoint": str(checkpoint), "view_from": args.view_from, "images": len(labels),
        "fp32_top1": round(float((fp32.argmax(1) == labels).float().mean()) * 100, 2),
        "bf16_top1": round(float((bf16.argmax(1) == labels).float().mean()) * 100, 2),
        "argmax_agreement": round(float((fp32.argmax(1) == bf16.argmax(1)).float().mean()) * 100, 2),
        "max_abs_logit_diff": round(float((fp32 - bf16).abs().max()), 4),
        "mean_kl_fp32_to_bf16": float(torch.nn.functional.kl_div(bf16.log_softmax(1), fp32.log_softmax(1),
                                                                 reduction="batchmean", log_target=True)),
        "ms_per_batch": ms, "batch": args.batch, "bf16_speedup": round(ms["fp32"] / ms["bf16"], 2),
        "threads": torch.get_num_threads()}))

if __name__ == "__main__":
    main()
