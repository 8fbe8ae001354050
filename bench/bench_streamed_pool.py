"""The student stage with `student.pool: memory` vs `streamed`: peak RSS at 1x and 10x the pool, images/s.

Prepares (once, under --work): a Fashion-MNIST import (--labels-per-class labels, --max-unlabeled
pool images in shards of 1,000), a "10x" copy whose unlabeled split repeats each pool shard
10 times under new keys (`r{copy}-{key}`, no truth file), and for each a run directory with the
data, teacher, pseudo_label_r1 and select_r1 stages done (tiny teacher budget). Then each case
runs `selftrain run --only student_r1` in a fresh copy of that run directory as a subprocess and
prints one JSON line: pool mode, pool scale, peak RSS of the subprocess (ru_maxrss from wait4),
training images/s and data-wait fraction from the stage's metrics.json. A last line gives the
ratios (targets: streamed RSS at 10x <= 1.2x streamed at 1x; streamed images/s >= 0.9x memory).
The student stage's RSS is mostly torch, the model and the in-memory labeled/test splits, so
"pool-only" cases also run just the pool in a bare process (memory: `load_selected_pool`;
streamed: one epoch through `PoolStream`) and give its peak RSS and its growth over the imports.

Usage:
  python bench/bench_streamed_pool.py                       # 40 steps, test_resnet at 32 px, 1 thread
  python bench/bench_streamed_pool.py --steps 10 --max-unlabeled 2000   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.atomic import read_json, write_json  # noqa: E402
from pipeline.data.shards import iter_shard, write_shards  # noqa: E402

PREPARED = ("data", "teacher", "pseudo_label_r1", "select_r1")


def common_sets(args: argparse.Namespace) -> list[str]:
    items = ["teacher.model.arch=test_resnet", f"teacher.model.input_size={args.size}", "teacher.train.steps=20",
             "teacher.train.batch_size=64", "student.model.arch=test_resnet", f"student.model.input_size={args.size}",
             f"student.train.steps={args.steps}", f"student.train.batch_size={args.batch}",
             "student.train.save_every_steps=100000", "student.model.init=teacher", "runtime.threads=1",
             f"runtime.workers={args.workers}", "runtime.progress=false", "pseudo_label.batch_size=500"]
    return [x for item in items for x in ("--set", item)]


def selftrain(config: Path, run: Path, args: argparse.Namespace, *extra: str) -> tuple[float, int]:
    """Run the CLI in a subprocess; (seconds, peak RSS in KiB of that process tree's largest process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run),
               *common_sets(args), *extra]
    t0 = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss


def scale_pool(source: Path, out: Path, copies: int) -> None:
    """`source` with its unlabeled split repeated `copies` times under new keys (and no truth file)."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("unlabeled", "unlabeled_truth.json"))
    manifest = read_json(source / "manifest.json")

    def samples():
        for copy in range(copies):
            for record in manifest["splits"]["unlabeled"]["shards"]:
                for sample in iter_shard(source / "unlabeled" / record["name"]):
                    yield {**sample, "__key__": f"r{copy}-{sample['__key__']}"}

    records = write_shards(out / "unlabeled", "unlabeled", samples(), 1000)
    manifest["splits"]["unlabeled"] = {"count": sum(r["count"] for r in records), "shards": records}
    manifest.pop("unlabeled_truth", None)
    write_json(out / "manifest.json", manifest)


def prepare(args: argparse.Namespace) -> dict[int, tuple[Path, Path]]:
    work = args.work
    data1 = work / "data1"
    if not (data1 / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "fashion-mnist", "--out", str(data1),
                        "--labels-per-class", str(args.labels_per_class), "--max-unlabeled", str(args.max_unlabeled),
                        "--shard-size", "1000", *(["--source", str(args.source)] if args.source else [])],
                       cwd=ROOT, check=True, capture_output=True)
    data10 = work / "data10"
    if not (data10 / "manifest.json").exists():
        scale_pool(data1, data10, 10)
    prepared = {}
    for scale, data in ((1, data1), (10, data10)):
        config = work / f"pool{scale}.yaml"
        config.write_text(f"seed: 0\ndata:\n  source: shards\n  path: {data}\n")
        run = work / f"prepared{scale}"
        if not (run / "select_r1" / "DONE").exists():
            for stage in PREPARED:
                selftrain(config, run, args, "--only", stage)
        prepared[scale] = (config, run)
    return prepared


def student_case(config: Path, prepared: Path, case_dir: Path, pool: str, scale: int,
                 args: argparse.Namespace) -> dict:
    shutil.rmtree(case_dir, ignore_errors=True)
    shutil.copytree(prepared, case_dir, ignore=shutil.ignore_patterns("lock"))
    seconds, rss_kib = selftrain(config, case_dir, args, "--only", "student_r1", "--set", f"student.pool={pool}",
                                 "--set", f"student.shuffle_buffer={args.shuffle_buffer}")
    metrics = read_json(case_dir / "student_r1" / "metrics.json")
    shutil.rmtree(case_dir, ignore_errors=True)
    return {"case": f"{pool}@{scale}x", "pool": pool, "scale": scale, "pool_images": metrics["num_pseudo_unique"],
            "pool_with_copies": metrics["num_pseudo_with_copies"], "steps": args.steps, "workers": args.workers,
            "peak_rss_mib": round(rss_kib / 1024, 1), "train_images_per_s": metrics["train_images_per_s"],
            "data_wait_fraction": metrics["data_wait_fraction"], "stage_seconds": round(seconds, 1)}


POOL_ONLY = """
import json, resource, sys
from pipeline.core.rundir import RunDir
from pipeline.data.imageset import open_data
from pipeline.data.pool import LabelForm, load_selected_pool
from pipeline.data.pool_stream import PoolStream, pool_shards
pool, data_dir, run = sys.argv[1], sys.argv[2], sys.argv[3]
data, rundir, form = open_data(data_dir), RunDir(run, data_dir), LabelForm("soft", 1.0, 0.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if pool == "memory":
    n = len(load_selected_pool(data, rundir, "pseudo_label_r1", "select_r1", form, progress=False).population())
else:
    shards = pool_shards(data, rundir, "pseudo_label_r1", "select_r1")
    stream = PoolStream(shards, form, 0, int(sys.argv[4]), data.image_keys)
    n = sum(s.copies for s in shards)
    for _ in range(n):
        stream.next_item()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after, "copies": n}))
"""


def pool_only_case(config: Path, run: Path, pool: str, scale: int, args: argparse.Namespace) -> dict:
    """Only the pool in a bare process: memory loads it, streamed reads one epoch through the buffer."""
    data_dir = config.read_text().split("path: ")[1].strip()
    out = subprocess.run([sys.executable, "-c", POOL_ONLY, pool, data_dir, str(run), str(args.shuffle_buffer)],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return {"case": f"pool-only {pool}@{scale}x", "pool": pool, "scale": scale, "pool_with_copies": found["copies"],
            "peak_rss_mib": round(found["after_kib"] / 1024, 1),
            "pool_rss_mib": round((found["after_kib"] - found["before_kib"]) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_streamed_pool"))
    parser.add_argument("--source", type=Path, default=None,
                        help="directory with the Fashion-MNIST idx .gz files (default: selftrain data's)")
    parser.add_argument("--labels-per-class", type=int, default=100)
    parser.add_argument("--max-unlabeled", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=1, help="runs per case; the best rate and lowest RSS are kept")
    parser.add_argument("--prepare-only", action="store_true", help="make the data and the runs, time nothing")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args)
    if args.prepare_only:
        return
    results = {}
    for scale in (1, 10):
        config, run = prepared[scale]
        cases: dict[str, list[dict]] = {"memory": [], "streamed": []}
        for _ in range(args.reps):  # interleaved, so that load from elsewhere hits both modes alike
            for pool in cases:
                cases[pool].append(student_case(config, run, args.work / "case", pool, scale, args))
        for pool, runs in cases.items():
            best = min(runs, key=lambda r: r["peak_rss_mib"])
            best["train_images_per_s"] = max(r["train_images_per_s"] for r in runs)
            best["reps"] = args.reps
            results[(pool, scale)] = best
            print(json.dumps(best), flush=True)
    for scale in (1, 10):
        for pool in ("memory", "streamed"):
            results["pool-only", pool, scale] = pool_only_case(*prepared[scale], pool, scale, args)
            print(json.dumps(results["pool-only", pool, scale]), flush=True)
    print(json.dumps({
        "case": "ratios",
        "pool_only_streamed_rss_10x_over_1x": round(results["pool-only", "streamed", 10]["peak_rss_mib"]
                                                    / results["pool-only", "streamed", 1]["peak_rss_mib"], 3),
        "pool_only_memory_rss_10x_over_1x": round(results["pool-only", "memory", 10]["peak_rss_mib"]
                                                  / results["pool-only", "memory", 1]["peak_rss_mib"], 3),
        "streamed_rss_10x_over_1x": round(results["streamed", 10]["peak_rss_mib"] / results["streamed", 1]["peak_rss_mib"], 3),
        "memory_rss_10x_over_1x": round(results["memory", 10]["peak_rss_mib"] / results["memory", 1]["peak_rss_mib"], 3),
        "streamed_over_memory_images_per_s_1x": round(results["streamed", 1]["train_images_per_s"]
                                                      / results["memory", 1]["train_images_per_s"], 3),
        "streamed_over_memory_images_per_s_10x": round(results["streamed", 10]["train_images_per_s"]
                                                       / results["memory", 10]["train_images_per_s"], 3),
        "targets": {"streamed_rss_10x_over_1x": "<= 1.2", "streamed_over_memory_images_per_s": ">= 0.9"}}),
        flush=True)


if __name__ == "__main__":
    main()
