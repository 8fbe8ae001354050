"""Re-measure every int8 model an export stage wrote against its fp32 model, interleaved.

Exports before 2026-12-01 timed each model once, one after the other, so a neighbouring process could
skew a row; the export stage now alternates a model's fp32 and int8 sessions over 3 rounds itself, and
this script re-measures with more rounds (on the AVX2-only machine the same ShuffleNet files measured
1.12x at batch 64 one day and 0.77x the next, both with 5 rounds: README "Deployment table"). For each
`<model>.onnx` / `<model>.int8.onnx` pair in EXPORT_DIR this alternates the two for `--rounds` rounds (onnxruntime batch-1 latency and
batch-64 throughput, `--repeats` runs each) and prints one JSON line per model with the medians and
the int8 speed-ups. Usage: python bench/bench_int8_speed.py RUN/export [--rounds 5] [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from students.deploy_metrics import int8_speed_vs_fp32
from students.export import onnx_session
from students.latency import interleaved_onnx_latency


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
    m = interleaved_onnx_latency(sessions, shape, batch=64, repeats=repeats, rounds=rounds)
    fp32_row, int8_row = m["fp32"], m["int8"]
    ratios = int8_speed_vs_fp32([{"model": "m", "runtime": "onnxruntime", "precision": precision, **m[precision]}
                                 for precision in ("fp32", "int8")])[0]  # the deployment table's ratios
    return {"fp32_batch1_ms": round(fp32_row["batch1_ms"], 3), "int8_batch1_ms": round(int8_row["batch1_ms"], 3),
            "fp32_batch64_img_s": round(fp32_row["batch64_img_s"], 1),
            "int8_batch64_img_s": round(int8_row["batch64_img_s"], 1),
            "batch1_speedup": ratios["batch1_speedup"], "batch64_speedup": ratios["batch64_speedup"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="an export stage's directory, e.g. runs/demo/export")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pairs = model_pairs(args.export_dir)
    if not pairs:
        sys.exit(f"bench_int8_speed: no <model>.onnx / <model>.int8.onnx pair in {args.export_dir}")
    for name, fp32, int8 in pairs:
        row = {"bench": "int8_speed", "model": name, "threads": args.threads, "rounds": args.rounds,
               **interleaved(fp32, int8, args.rounds, args.repeats, args.threads)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
