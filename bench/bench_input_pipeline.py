"""Training throughput with the real S1-S4 loader / throughput on pre-made in-memory batches.

DESIGN.md section 8 "input pipeline", issue 3 (goal: ratio >= 0.9 with S4 on CPU).

Both sides train the teacher model as the teacher stage builds it (timm model from
`teachers.models.create_model`, channels_last, `trainer.build_optimizer` SGD with Nesterov
momentum and the config's weight decay, LambdaLR warmup-cosine, `teacher_stage.supervised_loss`
with label smoothing, which calls `loader.to_model_input`), in the same process with the same
torch threads, on the same model and optimizer:

* real:      the labeled Fashion-MNIST images decoded from the shards into memory
             (`imageset.load_labeled_split`, as the teacher stage does), `AugmentedSources` +
             one `Source` + `StepBatchSampler` + `make_loader(workers)` + `collate_uint8`, as
             `pipeline.stages.teacher.run` wires them, the policy built by
             `augment.build_policy`. A fresh loader per timed segment; its start-up (time to the
             first batch) is reported apart and excluded, then `--warmup` untimed steps, then
             `--steps` timed steps. The sampler runs past the timed steps so the workers stay busy
             until the end of the timed window (no idle tail that would flatter the real side).
* in_memory: `--premade` batches collated once from the same dataset and policy (uint8 NCHW
             with channels_last strides, exactly what the loader yields), cycled; the step is
             identical (to_model_input + forward + backward + optimizer + scheduler).

The two sides run interleaved, real first in even rounds and in-memory first in odd ones
(AB BA AB ..., `--reps` rounds), so drift on a shared machine hits both and a steady drift
cancels over each pair of rounds. "ratio" is the median over rounds of (real rate / in-memory
rate of the same round); "ratio_of_totals" and the rates are total images / total timed wall time over the rounds.
data_wait_fraction is the share of the real side's timed step wall time spent in
`next(loader)`; the rest of any gap between the sides is the loader's workers taking CPU from
the training step (on a 2-core machine they share the cores with torch's threads).

Each line also gives neighbour_cpu_cores_per_round: CPU used meanwhile by other processes (and
steal), in cores. With 2 torch threads on 2 cores, a busy neighbour slows a step several times
over, so rounds above 0.15 cores are disturbed; ratio_quiet_rounds is the median over the
rounds at or below it (null when none was quiet: rerun on a quieter machine).

Prints one JSON line per (policy, workers) case, e.g.
  {"bench": "input_pipeline", "policy": "s4-n2-m10-j0.5:2.0", "workers": 2, "real_img_s": ...,
   "in_memory_img_s": ..., "ratio": ..., "data_wait_fraction": ..., ...}

Usage:
  python bench/bench_input_pipeline.py                       # s4, workers 0 1 2, 4 rounds of 30 steps
  python bench/bench_input_pipeline.py --policy s1 s2 s3 s4 --workers 2
  python bench/bench_input_pipeline.py --steps 4 --warmup 1 --reps 1 --workers 0   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import time
from statistics import median

import numpy as np
import torch

from augment import build_policy
from neighbour_load import NeighbourLoad
from pipeline.config.sections import TrainConfig
from pipeline.core.allocator import keep_freed_memory
from pipeline.data.loader import AugmentedSources, Source, StepBatchSampler, collate_uint8, make_loader
from pipeline.stages.teacher import supervised_loss
from pipeline.engine.trainer import build_optimizer, warmup_cosine
from teachers.models import create_model
from device import add_device_args, autocast, describe, device_of, sync
from training_bench import add_model_data_args, cycle, labeled_images

QUIET_CORES = 0.15  # a round is "quiet" when other processes used at most this many cores meanwhile


class Stepper:
    """One optimizer step exactly as `pipeline.engine.trainer.train` does it on one CPU process."""

    def __init__(self, args: argparse.Namespace, num_classes: int, in_chans: int, labels: torch.Tensor,
                 mean: torch.Tensor, std: torch.Tensor) -> None:
        torch.manual_seed(args.seed)
        cfg = TrainConfig(policy="s1", batch_size=args.batch)  # optimiser settings of the teacher config
        self.channels_last = not args.no_channels_last
        self.device = device_of(args)
        self.autocast = lambda: autocast(self.device, args.precision)
        self.model = create_model(args.arch, num_classes, in_chans).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(10_000, 100))
        model = torch.compile(self.model) if args.compile else self.model
        loss_fn = supervised_loss(labels, mean.to(self.device), std.to(self.device), self.device,
                                  self.channels_last, cfg.label_smoothing)
        self.loss_fn = lambda batch: loss_fn(model, batch)

    def __call__(self, batch) -> None:
        with self.autocast():
            losses = self.loss_fn(batch)
        losses["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed_steps(batches, step: Stepper, warmup: int, steps: int) -> tuple[float, float, float]:
    """(timed wall s, of which waiting for batches s, time to the first batch s)."""
    started = time.perf_counter()
    iterator = iter(batches)
    first = next(iterator)
    startup = time.perf_counter() - started
    step(first)
    for _ in range(warmup - 1):
        step(next(iterator))
    sync(step.device)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tick = time.perf_counter()
        batch = next(iterator)
        wait += time.perf_counter() - tick
        step(batch)
    sync(step.device)
    wall = time.perf_counter() - t0
    del iterator  # shuts the workers down before the other side runs
    return wall, wait, startup


def run_case(args: argparse.Namespace, policy_name: str, workers: int, images: list[np.ndarray],
             step: Stepper) -> dict:
    policy = build_policy(policy_name, args.size)
    dataset = AugmentedSources([images], policy)
    n = len(dataset)
    sources = [Source(np.arange(n), min(args.batch, n))]
    # pre-made batches: the loader's own output for the first steps, built once, single-threaded
    premade_sampler = StepBatchSampler(sources, args.premade, args.seed)
    t0 = time.perf_counter()
    premade = [collate_uint8([dataset[item] for item in items]) for items in premade_sampler]
    augment_ms_per_batch = 1000 * (time.perf_counter() - t0) / len(premade)

    # extra sampler steps keep every worker's prefetch queue busy through the timed window
    tail = 4 * max(1, workers) + 2
    per_segment = args.warmup + args.steps + tail
    real, memory, neighbours = [], [], []
    for rep in range(args.reps):
        load = NeighbourLoad()
        sampler = StepBatchSampler(sources, (rep + 1) * per_segment, args.seed, start_step=rep * per_segment)
        loader = make_loader(dataset, sampler, workers, args.seed)
        if rep % 2 == 0:  # A B, B A, A B, ...: a steady drift cancels over each pair of rounds
            real.append(timed_steps(loader, step, args.warmup, args.steps))
            memory.append(timed_steps(cycle(premade), step, args.warmup, args.steps))
        else:
            memory.append(timed_steps(cycle(premade), step, args.warmup, args.steps))
            real.append(timed_steps(loader, step, args.warmup, args.steps))
        del loader
        neighbours.append(round(load.cores(), 2))

    quiet = [m[0] / r[0] for r, m, cores in zip(real, memory, neighbours) if cores <= QUIET_CORES]
    images_timed = args.steps * args.batch * args.reps
    real_rate = images_timed / sum(r[0] for r in real)
    memory_rate = images_timed / sum(m[0] for m in memory)
    return {
        "bench": "input_pipeline", "policy": str(policy), "workers": workers,
        "real_img_s": round(real_rate, 1), "in_memory_img_s": round(memory_rate, 1),
        "ratio": round(median(m[0] / r[0] for r, m in zip(real, memory)), 3),
        "data_wait_fraction": round(sum(r[1] for r in real) / sum(r[0] for r in real), 4),
        "ratio_of_totals": round(real_rate / memory_rate, 3),
        "ratio_per_round": [round(m[0] / r[0], 3) for r, m in zip(real, memory)],
        "data_wait_fraction_per_round": [round(r[1] / r[0], 4) for r in real],
        "real_step_ms": round(1000 * sum(r[0] for r in real) / (args.steps * args.reps), 1),
        "in_memory_step_ms": round(1000 * sum(m[0] for m in memory) / (args.steps * args.reps), 1),
        "augment_ms_per_batch_1proc": round(augment_ms_per_batch, 1),
        "loader_startup_s": round(median(r[2] for r in real), 3),
        "neighbour_cpu_cores_per_round": neighbours,
        "quiet_rounds": len(quiet),
        "ratio_quiet_rounds": round(median(quiet), 3) if quiet else None,
        "arch": args.arch, "size": args.size, "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.reps, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "channels_last": step.channels_last, "num_labeled": n,
        "device": describe(step.device), "precision": args.precision, "compile": args.compile,
        **{k.lower(): os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
           if k in os.environ},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(parser)
    parser.add_argument("--policy", nargs="+", default=["s4"], help="s1 s2 s3 s4 (any policy string)")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per segment")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per segment (>= 1)")
    parser.add_argument("--reps", type=int, default=4, help="rounds per case (AB, BA, ...; even is best)")
    parser.add_argument("--premade", type=int, default=8, help="distinct pre-made batches")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    add_device_args(parser)
    args = parser.parse_args()
    keep_freed_memory()  # as `selftrain` does (bench_allocator.py measures it)
    args.warmup = max(1, args.warmup)
    if args.threads:
        torch.set_num_threads(args.threads)

    data, images, labels, mean, std = labeled_images(args.data)
    step = Stepper(args, data.num_classes, data.in_chans, labels, mean, std)
    for policy_name in args.policy:
        for workers in args.workers:
            print(json.dumps(run_case(args, policy_name, workers, images, step)), flush=True)


if __name__ == "__main__":
    main()
