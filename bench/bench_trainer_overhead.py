"""Training images/s through the pipeline's trainer / through a minimal hand-written loop (DESIGN.md §8
"trainer overhead"), same model, batches and torch threads, in one process.

Three sides train the teacher model as the teacher stage builds it (timm model from
`teachers.models.create_model`, channels_last; `teacher.supervised_loss` with label smoothing, which
calls `loader.to_model_input`) on the same `--premade` uint8 batches (the S1 loader's own output,
built once and cycled, so no side waits for data):

* trainer:   `pipeline.engine.trainer.train` as every training stage calls it, with the accelerator
             `pipeline.engine.runtime.make_accelerator` makes: `accelerator.prepare`, the optimizer of
             `build_optimizer`, the warm-up cosine schedule, the progress bar and progress file, the
             loss history, the kill points, and the training state saved every `--save-every` steps
             (configs/fashion_mnist.yaml's 100) into a fresh state directory; on CPU it takes the small-map weight
             gradients (`pipeline.engine.small_map_conv`);
* hand:      `for batch in batches: loss = loss_fn(model, batch); loss.backward(); opt.step();
             opt.zero_grad()` with `torch.optim.SGD` (the same lr, Nesterov momentum and weight decay, on every
             parameter where the trainer spares 1-d ones), what a user would write: no schedule, no saves,
             plain convolutions;
* hand_same_kernels: the hand loop inside `small_map_weight_grads(model)`, the kernels the trainer
             takes on CPU, so `ratio_vs_same_kernels` is the cost of the trainer's bookkeeping alone.

Each side starts every round from the same initial weights (a fresh copy) and a fresh optimizer, in rotated
order (ABC, BCA, CAB, ...), so drift on a shared machine hits every side. Rates count the `--steps` timed steps
only, after `--warmup` untimed ones: the hand loops time from their first step after the warm-up, the trainer
by its own clock in a second `train` call on another fresh copy (its clock starts after its set-up; the first
timed step also allocates that optimizer's state, about a model's size of memory). `*_with_setup` also counts
each side's set-up (the trainer's `prepare`, optimizer and state directory) and warm-up steps. Ratios are
medians over rounds of (trainer rate / other side's rate of the same round). With `--device cuda` the trainer
runs where accelerate puts it (the first visible GPU: choose with CUDA_VISIBLE_DEVICES).

Prints one JSON line, e.g.
  {"bench": "trainer_overhead", "trainer_img_s": ..., "hand_img_s": ..., "ratio_vs_hand": ...,
   "ratio_vs_same_kernels": ..., ...}

Usage:
  python bench/bench_trainer_overhead.py                          # resnet18 32 px, batch 128, 3 rounds of 120 steps
  python bench/bench_trainer_overhead.py --arch mobilenetv3_small_100 --size 64 --batch 256
  python bench/bench_trainer_overhead.py --steps 3 --warmup 1 --reps 1 --save-every 2   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from itertools import islice
from pathlib import Path
from statistics import median
from typing import Callable, Iterator

import numpy as np
import torch

from augment import build_policy
from device import add_device_args, autocast, describe, device_of, sync
from neighbour_load import NeighbourLoad
from pipeline.config.sections import RuntimeConfig, TrainConfig
from pipeline.core.allocator import keep_freed_memory
from pipeline.data.loader import AugmentedSources, Batch, Source, StepBatchSampler, collate_uint8
from pipeline.engine.runtime import make_accelerator
from pipeline.engine.small_map_conv import small_map_weight_grads
from pipeline.engine.trainer import train
from pipeline.stages.teacher import supervised_loss
from teachers.models import create_model
from training_bench import add_model_data_args, cycle, labeled_images

SIDES = ("trainer", "hand", "hand_same_kernels")


def premade_batches(images: list[np.ndarray], size: int, batch: int, count: int, seed: int) -> list[Batch]:
    dataset = AugmentedSources([images], build_policy("s1", size))
    sampler = StepBatchSampler([Source(np.arange(len(dataset)), min(batch, len(dataset)))], count, seed)
    return [collate_uint8([dataset[item] for item in items]) for items in sampler]


class Sides:
    """The initial model, the shared batches and loss; each side timed from a fresh copy of the model."""

    def __init__(self, args: argparse.Namespace, batches: list[Batch], loss_fn: Callable, num_classes: int,
                 in_chans: int, work: Path) -> None:
        self.args, self.batches, self.loss_fn, self.work = args, batches, loss_fn, work
        self.device = device_of(args)
        if (self.device.type == "cuda") != torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: the trainer runs where accelerate puts it "
                             f"({'cuda' if torch.cuda.is_available() else 'cpu'} here); pass that device")
        torch.manual_seed(args.seed)
        self.initial = create_model(args.arch, num_classes, in_chans).to(self.device, memory_format=torch.channels_last)
        self.cfg = TrainConfig(policy="s1", batch_size=args.batch, save_every_steps=args.save_every,
                               warmup_epochs=0)  # the teacher config's optimizer settings
        self.runtime = replace(RuntimeConfig(), mixed_precision=args.precision)
        self.rounds = 0
        timed = islice(cycle(batches), args.warmup, args.warmup + args.steps)
        self.timed_images = sum(len(batch) for batch in timed)  # a small labeled set makes smaller batches
        self.round_images = sum(len(batch) for batch in islice(cycle(batches), args.warmup + args.steps))

    def fresh_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.initial).train()

    def run(self, side: str) -> tuple[float, float]:
        """(timed seconds of `--steps` steps, seconds of the whole call including set-up and warm-up)."""
        started = time.perf_counter()
        if side == "trainer":
            timed = self._trainer()
        else:
            timed = self._hand(side == "hand_same_kernels")
        return timed, time.perf_counter() - started

    def _trainer(self) -> float:
        """Two calls of `train`, as two short runs on fresh copies of the model: the warm-up steps, then the timed
        ones (the trainer's own clock, which starts after its set-up); each call with its own accelerator and
        state directory, as a stage has (and one `prepare` per model, as a stage does)."""
        self.rounds += 1
        state = self.work / f"state-{self.rounds}"
        for name, steps, offset in (("warmup", self.args.warmup, 0), ("timed", self.args.steps, self.args.warmup)):
            accelerator = make_accelerator(self.runtime, self.work / "logs", name, {})
            result = train(accelerator, self.fresh_model(), self.cfg, steps, steps, self._from(offset, steps),
                           self.loss_fn, state_dir=state / name, name=f"bench-{name}", progress=name == "timed")
        shutil.rmtree(state, ignore_errors=True)
        return result.seconds  # the timed call's

    def _from(self, offset: int, count: int) -> Callable[[int], Iterator[Batch]]:
        """`train`'s batch source: the `count` batches after the first `offset` (a sampler ends at total_steps)."""
        def batches(start: int) -> Iterator[Batch]:
            return islice(cycle(self.batches), offset + start, offset + count)
        return batches

    def _hand(self, same_kernels: bool) -> float:
        model = self.fresh_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                    nesterov=self.cfg.momentum > 0, weight_decay=self.cfg.weight_decay)
        stream = cycle(self.batches)
        kernels = small_map_weight_grads(model) if same_kernels and self.device.type == "cpu" else nullcontext()
        with kernels:
            t0 = 0.0
            for step in range(self.args.warmup + self.args.steps):
                if step == self.args.warmup:
                    sync(self.device)
                    t0 = time.perf_counter()
                with autocast(self.device, self.args.precision):
                    loss = self.loss_fn(model, next(stream))["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync(self.device)
        return time.perf_counter() - t0


def measure(args: argparse.Namespace, sides: Sides) -> dict:
    timed: dict[str, list[float]] = {side: [] for side in SIDES}
    whole: dict[str, list[float]] = {side: [] for side in SIDES}
    neighbours = []
    for rep in range(args.reps):
        load = NeighbourLoad()
        for side in SIDES[rep % 3:] + SIDES[:rep % 3]:  # ABC, BCA, CAB, ...
            seconds, total = sides.run(side)
            timed[side].append(seconds)
            whole[side].append(total)
        neighbours.append(round(load.cores(), 2))
    images = sides.timed_images

    def ratio(other: str, table: dict[str, list[float]]) -> float:
        return round(median(o / t for t, o in zip(table["trainer"], table[other])), 3)

    return {
        "bench": "trainer_overhead",
        **{f"{side}_img_s": round(images * args.reps / sum(timed[side]), 1) for side in SIDES},
        "ratio_vs_hand": ratio("hand", timed), "ratio_vs_same_kernels": ratio("hand_same_kernels", timed),
        "ratio_vs_hand_with_setup": ratio("hand", whole),
        "ratio_vs_same_kernels_with_setup": ratio("hand_same_kernels", whole),
        **{f"{side}_img_s_per_round": [round(images / s, 1) for s in timed[side]] for side in SIDES},
        "trainer_img_s_with_setup": round(sides.round_images * args.reps / sum(whole["trainer"]), 1),
        "state_saves_per_round": (args.steps - 1) // args.save_every,
        "neighbour_cpu_cores_per_round": neighbours,
        "arch": args.arch, "size": args.size, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.reps, "save_every": args.save_every, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "device": describe(sides.device), "precision": args.precision,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(parser)
    parser.add_argument("--steps", type=int, default=120, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (>= 1)")
    parser.add_argument("--reps", type=int, default=3, help="rounds (each side once per round, order rotated)")
    parser.add_argument("--save-every", type=int, default=100,
                        help="the trainer saves its state every N steps (configs/fashion_mnist.yaml's 100)")
    parser.add_argument("--premade", type=int, default=8, help="distinct pre-made batches")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_args(parser)
    args = parser.parse_args()
    keep_freed_memory()  # as `selftrain` does
    args.warmup = max(1, args.warmup)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, images, labels, mean, std = labeled_images(args.data)
    device = device_of(args)
    loss_fn = supervised_loss(labels, mean.to(device), std.to(device), device, True,
                              TrainConfig(policy="s1").label_smoothing)
    batches = premade_batches(images, args.size, args.batch, args.premade, args.seed)
    with tempfile.TemporaryDirectory(prefix="trainer-overhead-") as work:
        sides = Sides(args, batches, loss_fn, data.num_classes, data.in_chans, Path(work))
        print(json.dumps(measure(args, sides)), flush=True)


if __name__ == "__main__":
    main()
