"""Re-measure every int8 model an export stage wrote against its fp32 model, interleaved.

Exports before 2026-12-01 timed each model once, one after the other, so a neighbouring process could
skew a row; the export stage now alternates a model's fp32 and int8 sessions over 3 rounds itself, and
this script re-measures with more rounds (on the AVX2-only machine the same ShuffleNet files measured
1.12x at batch 64 one day and 0.77x the next, both with 5 rounds: README "Deployment table"). For each
`<model>.onnx` / `<model>.int8.onnx` pair in EXPORT_DIR this alternates the two for `--rounds` rounds (onnxruntime batch-1 latency and
batch-64 throughput, `--repeats` runs each) and prints one JSON line per model with the medians and
the int8 speed-ups, and each round's batch-64 throughputs (`*_batch64_img_s_by_round`), which show a spell of
load passing. Several `--threads` give one line per model and thread count: on the 2-vCPU AMD EPYC with AVX-512
(README "Deployment table") ShuffleNet's int8 model ran as fast on one thread as on two at batch 64, and in
spells of host slowness, which the VM cannot see, its two-thread throughput halved while one thread mostly kept
its speed. Usage: python bench/bench_int8_speed.py RUN/export [--rounds 5] [--repeats 30] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from students.deploy_metrics import int8_speed_vs_fp32
from students.export import onnx_session
from students.latency import interleaved_onnx_samples, median_over_rounds


def model_pairs(export_dir: Path) -> list[tuple[str, Path, Path]]:
    """(model, fp32 file, int8 file) for every int8 file whose fp32 file is beside it."""
    pairs = []
    for int8 in sorted(export_dir.glob("*.int8.onnx")):
        name = int8.name[: -len(".int8.onnx")]
        if (export_dir / f"{name}.onnx").exists():
            pairs.append((name, export_dir / f"{name}.onnx", int8))
    return pairs


def interleaved(fp32: Path, int8: Path, rounds: int, repeats: int, threads: int) -> dict:
    sessions = {"fp32": onnx_session(fp32, threads), "int8": onnx_session(int8, threads)}
    shape = tuple(int(d) for d in sessions["fp32"].get_inputs()[0].shape[1:])
    samples = interleaved_onnx_samples(sessions, shape, batch=64, repeats=repeats, rounds=rounds)
    medians = median_over_rounds(samples, batch=64)
    ratios = int8_speed_vs_fp32([{"model": "m", "runtime": "onnxruntime", "precision": precision, **medians[precision]}
                                 for precision in ("fp32", "int8")])[0]  # the deployment table's ratios
    row = {f"{precision}_{key}": round(value, 3 if key == "batch1_ms" else 1)
           for precision, figures in medians.items() for key, value in figures.items()}
    row.update(batch1_speedup=ratios["batch1_speedup"], batch64_speedup=ratios["batch64_speedup"])
    for precision, runs in samples.items():
        row[f"{precision}_batch64_img_s_by_round"] = [round(run["batch64_img_s"], 1) for run in runs]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="an export stage's directory, e.g. runs/demo/export")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="one or more intra-op thread counts")
    args = parser.parse_args()
    pairs = model_pairs(args.export_dir)
    if not pairs:
        sys.exit(f"bench_int8_speed: no <model>.onnx / <model>.int8.onnx pair in {args.export_dir}")
    for name, fp32, int8 in pairs:
        for threads in args.threads:
            row = {"bench": "int8_speed", "model": name, "threads": threads, "rounds": args.rounds,
                   **interleaved(fp32, int8, args.rounds, args.repeats, threads)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
