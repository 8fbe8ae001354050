"""Pseudo-labeling efficiency: end-to-end shard -> sidecar images/s / bare teacher forward images/s.

DESIGN.md section 8, issue 4 (goal: >= 0.85 on CPU).

* real: `pipeline.stages.pseudo_label.label_shards` on the first `--shards` unlabeled shards of
  the imported data dir (tar read, PNG decode, eval transform and collate in `--workers`
  DataLoader workers, `to_model_input`, forward under inference_mode, fp16 sidecar written
  atomically into a temporary directory). Timed end to end, worker start-up included.
* bare: the same model (teacher checkpoint, eval mode, channels_last) forwarding one
  pre-made, already normalised float batch of `--batch` real eval-transformed images, under
  inference_mode, `--bare-batches` times.

Same process, same torch threads, same batch size. The sides run interleaved: bare, real, bare,
real, ..., bare (`--reps` real rounds). Each real round is divided by the mean of the bare
rounds on either side of it; "ratio" is the median of these per-round ratios. The rates are
totals over the rounds (images / seconds).

Each line also gives neighbour_cpu_cores(_per_round): CPU used meanwhile by other processes (and
steal), in cores. With 2 torch threads on 2 cores a busy neighbour slows the forward several
times over, so rounds above 0.15 cores are disturbed; ratio_quiet_rounds is the median over the
rounds at or below it (null when none was quiet: rerun on a quieter machine).

With `--breakdown` (default on) a second JSON line gives the cost of each stage of the real
path measured one at a time in this process on one shard: tar read, PNG decode, eval
transform and collate (single thread, as in a DataLoader worker), to_model_input, forward and
logits copy (torch threads), sidecar write -- in microseconds per image.

Usage:
  python bench/bench_pseudo_label.py                      # 4 shards (20,000 images), batch 500, 2 workers
  python bench/bench_pseudo_label.py --workers 0 1 2      # one line per worker count
  python bench/bench_pseudo_label.py --shards 1 --reps 1 --bare-batches 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

import numpy as np
import torch

from augment import build_eval_transform
from neighbour_load import NeighbourLoad
from device import add_device_args, autocast, describe, device_of, sync
from pipeline.config.sections import PseudoLabelConfig
from pipeline.core.allocator import keep_freed_memory
from pipeline.data.imageset import open_data
from pipeline.data.loader import to_model_input
from pipeline.stages.pseudo_label import Labeler, LabelingJob, label_shards
from pipeline.data.shards import decode_image, iter_shard
from teachers.checkpoint import checkpoint_hash, load_checkpoint
from teachers.sidecar import write_sidecar

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "runs" / "fm" / "data"
DEFAULT_TEACHER = ROOT / "runs" / "fm" / "teacher" / "checkpoint"
QUIET_CORES = 0.15  # a round is "quiet" when other processes used at most this many cores meanwhile


def bare_rate(model: torch.nn.Module, x: torch.Tensor, batches: int, precision: str = "no") -> float:
    with torch.inference_mode(), autocast(x.device, precision):
        sync(x.device)
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        sync(x.device)
        return batches * len(x) / (time.perf_counter() - start)


def omp_env() -> dict:
    """Thread settings that change CPU results, recorded with them."""
    return {k.lower(): os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
            if k in os.environ}


def real_rate(labeler: Labeler, job: LabelingJob, tmp: Path, rep: int, workers: int) -> float:
    out_dir = tmp / f"round{rep}-w{workers}"
    job = replace(job, workers=workers, sidecars=[out_dir / (p.stem + ".labels.npz") for p in job.shards])
    total = job.total_images
    start = time.perf_counter()
    labeled = label_shards(labeler, job)
    seconds = time.perf_counter() - start
    if labeled != total:
        raise RuntimeError(f"label_shards labeled {labeled} images, expected {total}")
    return labeled / seconds


def breakdown(model, shard: Path, transform, mode: str, mean, std, batch: int, channels_last: bool,
              tmp: Path, precision: str = "no") -> dict:
    """Each stage of the real path alone on one shard, in microseconds per image."""
    t = time.perf_counter
    t0 = t()
    samples = list(iter_shard(shard, on_error="skip"))
    t1 = t()
    decoded = [decode_image(s, shard, mode) for s in samples]
    t2 = t()
    transformed = [transform(image) for image in decoded]
    t3 = t()
    uint8_batches = [torch.from_numpy(np.stack(transformed[lo:lo + batch])).permute(0, 3, 1, 2)
                     for lo in range(0, len(transformed), batch)]
    t4 = t()
    device = mean.device
    inputs = [to_model_input(b, mean, std, device, channels_last) for b in uint8_batches]
    sync(device)
    t5 = t()
    with torch.inference_mode(), autocast(device, precision):
        outputs = [model(x) for x in inputs]
        sync(device)
        t6 = t()
        logits = [o.float().cpu().numpy() for o in outputs]
    t7 = t()
    write_sidecar(tmp / "breakdown.labels.npz", [str(s["__key__"]) for s in samples], np.concatenate(logits),
                  {"bench": True}, None)
    t8 = t()
    n = len(samples)
    us = {name: round(1e6 * seconds / n, 1) for name, seconds in [
        ("tar_read", t1 - t0), ("png_decode", t2 - t1), ("eval_transform", t3 - t2), ("collate", t4 - t3),
        ("to_model_input", t5 - t4), ("forward", t6 - t5), ("logits_to_numpy", t7 - t6), ("sidecar_write", t8 - t7)]}
    loader = us["tar_read"] + us["png_decode"] + us["eval_transform"] + us["collate"]
    main = us["to_model_input"] + us["forward"] + us["logits_to_numpy"] + us["sidecar_write"]
    return {"bench": "pseudo_label_breakdown", "shard": shard.name, "images": n, "us_per_image": us,
            "loader_side_us_per_image_1thread": round(loader, 1),
            "main_side_us_per_image": round(main, 1),
            "serial_bound_ratio": round(us["forward"] / (loader + main), 3),
            "note": "loader side runs in DataLoader workers (1 thread each); main side in the main process "
                    f"with {torch.get_num_threads()} torch threads; serial_bound_ratio = forward / everything "
                    "(what workers=0 would reach)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="imported data dir (read only)")
    parser.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, help="teacher checkpoint dir (read only)")
    parser.add_argument("--shards", type=int, default=4, help="first N unlabeled shards")
    parser.add_argument("--batch", type=int, default=PseudoLabelConfig().batch_size)
    parser.add_argument("--workers", nargs="+", type=int, default=[2])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=3, help="real rounds per worker count (each between two bare ones)")
    parser.add_argument("--bare-batches", type=int, default=10, help="timed bare forwards per round")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-breakdown", action="store_true")
    add_device_args(parser)
    args = parser.parse_args()
    keep_freed_memory()  # as `selftrain` does (bench_allocator.py measures it)
    if args.threads:
        torch.set_num_threads(args.threads)
    channels_last = not args.no_channels_last

    data = open_data(args.data)
    records = data.shard_records("unlabeled")[:args.shards]
    shards = [data.shard_path("unlabeled", r["name"]) for r in records]
    total = sum(int(r["count"]) for r in records)
    teacher_hash = checkpoint_hash(args.teacher)
    model, meta = load_checkpoint(args.teacher, num_classes=data.num_classes)
    device = device_of(args)
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    transform = build_eval_transform(meta.input_size)
    mean, std = torch.tensor(meta.mean, device=device), torch.tensor(meta.std, device=device)
    topk = PseudoLabelConfig().topk if data.num_classes > PseudoLabelConfig().topk_above_classes else None

    # one real batch, decoded, eval-transformed and normalised once
    first = []
    for sample in iter_shard(shards[0], on_error="skip"):
        first.append(transform(decode_image(sample, shards[0], data.mode)))
        if len(first) == args.batch:
            break
    uint8 = torch.from_numpy(np.stack(first)).permute(0, 3, 1, 2)
    x = to_model_input(uint8, mean, std, device, channels_last)
    bare_rate(model, x, 2, args.precision)  # warm-up (oneDNN primitives / cuDNN autotune, allocator)

    labeler = Labeler(model, transform, mean, std, device, channels_last, args.precision, teacher_hash)
    job = LabelingJob(shards=shards, records=records, sidecars=[], mode=data.mode, num_classes=data.num_classes,
                      batch_size=args.batch, workers=0, topk=topk, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench-pseudo-label-") as tmp_name:
        tmp = Path(tmp_name)
        for workers in args.workers:
            # bare, real, bare, real, ..., bare: each real round is compared with the mean of the
            # bare rounds just before and after it, so drift on a shared machine hits both sides
            load = NeighbourLoad()
            segment = NeighbourLoad()
            bare = [bare_rate(model, x, args.bare_batches, args.precision)]
            real, neighbours = [], []
            for rep in range(args.reps):
                # a round spans bare before, real, bare after
                real.append(real_rate(labeler, job, tmp, rep, workers))
                bare.append(bare_rate(model, x, args.bare_batches, args.precision))
                neighbours.append(round(segment.cores(), 2))
                segment = NeighbourLoad()
            per_round = [r / ((bare[i] + bare[i + 1]) / 2) for i, r in enumerate(real)]
            quiet = [ratio for ratio, cores in zip(per_round, neighbours) if cores <= QUIET_CORES]
            real_total = len(real) * total / sum(total / r for r in real)
            bare_total = len(bare) / sum(1 / b for b in bare)
            print(json.dumps({
                "bench": "pseudo_label", "real_img_s": round(real_total, 1), "bare_forward_img_s": round(bare_total, 1),
                "ratio": round(median(per_round), 3), "ratio_per_round": [round(r, 3) for r in per_round],
                "real_img_s_per_round": [round(r, 1) for r in real], "bare_img_s_per_round": [round(b, 1) for b in bare],
                "neighbour_cpu_cores": round(load.cores(), 2), "neighbour_cpu_cores_per_round": neighbours,
                "quiet_rounds": len(quiet), "ratio_quiet_rounds": round(median(quiet), 3) if quiet else None,
                "shards": len(shards), "images": total, "batch": args.batch, "workers": workers,
                "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "channels_last": channels_last,
                "arch": meta.arch, "input_size": meta.input_size, "rounds": args.reps, **omp_env(),
                "device": describe(device), "precision": args.precision,
            }), flush=True)
        if not args.no_breakdown:
            print(json.dumps(breakdown(model, shards[0], transform, data.mode, mean, std, args.batch,
                                       channels_last, tmp, args.precision)), flush=True)


if __name__ == "__main__":
    main()
