"""Training images/s with glibc's default malloc thresholds against `keep_freed_memory()`
(pipeline/core/allocator.py, what `selftrain` sets at start).

The setting is per process and cannot be undone, so each measurement is its own process; the two
kinds alternate, `--repeats` times each, so a slow spell of a shared machine hits both alike. A
training step is the trainer's on CPU: channels_last fp32 with the small-map weight gradients
(bench_train_step.py). Prints one JSON line per architecture: the median images/s of each kind, their
ratio, and every pair's ratio.
Usage: python bench/bench_allocator.py [--model resnet18:32:384:sgd shufflenet_v2_x1_0:64:256:adamw ...] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench_train_step import train_rate

from pipeline.core.allocator import OPT_OUT_ENV, keep_freed_memory

# what the demo trains: round 1 (SGD), the distilled ShuffleNet and the goal's MobileNetV3 (AdamW)
DEFAULT_MODELS = ["resnet18:32:384:sgd", "shufflenet_v2_x1_0:64:256:adamw", "mobilenetv3_small_100:64:256:adamw"]


def measure_in_child(spec: str, steps: int, keep: bool) -> float:
    """Images/s of one fresh process, with glibc's defaults or with freed memory kept."""
    env = dict(os.environ, **{OPT_OUT_ENV: "1" if keep else "0"})
    command = [sys.executable, __file__, "--child", spec, "--steps", str(steps)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def child(model: str, steps: int) -> None:
    arch, size, batch, optimizer = parse_model(model)
    keep_freed_memory()  # a no-op under SELFTRAIN_KEEP_FREED_MEMORY=0
    rate, _ = train_rate(arch, size, batch, steps, channels_last=True, in_chans=1, small_map_grad=True,
                         optimizer=optimizer)
    print(rate)


def parse_model(spec: str) -> tuple[str, int, int, str]:
    parts = spec.split(":")
    if len(parts) == 3:
        parts.append("sgd")
    if len(parts) != 4 or not (parts[1].isdigit() and parts[2].isdigit() and parts[3] in ("sgd", "adamw")):
        raise SystemExit(f"--model {spec!r}: expected ARCH:SIZE:BATCH[:sgd|adamw], e.g. resnet18:32:384:sgd")
    return parts[0], int(parts[1]), int(parts[2]), parts[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=DEFAULT_MODELS, help="ARCH:SIZE:BATCH[:sgd|adamw]")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process, after two warm-up steps")
    parser.add_argument("--repeats", type=int, default=4, help="processes of each kind, alternating")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    for spec in args.model:
        arch, size, batch, optimizer = parse_model(spec)
        pairs = [(measure_in_child(spec, args.steps, keep=False), measure_in_child(spec, args.steps, keep=True))
                 for _ in range(args.repeats)]
        default, kept = (statistics.median(kind) for kind in zip(*pairs))
        print(json.dumps({"bench": "allocator", "arch": arch, "size": size, "batch": batch, "optimizer": optimizer,
                          "steps": args.steps,
                          "glibc_default_img_s": round(default, 1), "keep_freed_img_s": round(kept, 1),
                          "keep_freed_ratio": round(kept / default, 3),
                          "pair_ratios": [round(b / a, 3) for a, b in pairs]}), flush=True)


if __name__ == "__main__":
    main()
