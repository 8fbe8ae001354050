"""What every training stage shares: set-up, evaluation, checkpoint and metrics.

A stage (teacher, student round i) builds a `TrainingSetup`, runs
`pipeline.engine.trainer.train` with its own data sources and loss, then calls
`finish` to evaluate on the test split, export the checkpoint, write
metrics.json and mark the stage done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator

from augment import build_eval_transform, build_policy, parse_policy
from pipeline.config.sections import Config, StageConfig, StudentConfig, TrainConfig
from pipeline.config.schema import to_dict
from pipeline.data.imageset import DataInfo, ImageSet, channel_stats, load_labeled_split
from pipeline.data.loader import Transform
from pipeline.core.metrics import classification_metrics
from pipeline.engine.predict import checkpoint_logits, predict_logits
from pipeline.core.rundir import RunDir
from pipeline.engine.runtime import configure_threads, loader_workers, make_accelerator, use_channels_last
from pipeline.engine.trainer import TrainResult
from pipeline.engine.init import InitOutcome, InitSource, apply_init, resolve_init
from teachers.checkpoint import CheckpointMeta, save_checkpoint
from teachers.models import create_model

NOT_RESULT_AFFECTING = ("save_every_steps", "eval_batch_size")


def train_fingerprint_inputs(train: TrainConfig) -> dict:
    """The optimisation settings a trained model depends on (save cadence and eval batch excluded)."""
    found = {k: v for k, v in to_dict(train).items() if k not in NOT_RESULT_AFFECTING}
    if found.get("steps") is None:  # unset: runs made before `train.steps` existed keep their fingerprint
        found.pop("steps", None)
    found["policy"] = str(parse_policy(train.policy))
    return found


def training_fingerprint_inputs(stage: StageConfig | StudentConfig, seed: int, data: DataInfo) -> dict:
    """What a trained model depends on (runtime and save cadence excluded)."""
    return {"model": to_dict(stage.model), "train": train_fingerprint_inputs(stage.train), "seed": seed,
            "data_manifest": data.manifest["splits"]["labeled"]["shards"]}


def init_lineage(source: InitSource) -> str | None:
    return None if source.is_random else str(source.path) if source.path is not None else source.text


def build_model(stage: StageConfig | StudentConfig, data: DataInfo, init: InitSource) -> tuple[torch.nn.Module, InitOutcome]:
    """The stage's model, with `init`'s weights (pipeline/engine/init.py)."""
    model = create_model(stage.model.arch, data.num_classes, data.in_chans,
                         stage.model.drop_rate, stage.model.drop_path_rate)
    return model, apply_init(model, init, stage.model.arch, tuple(data.classes), data.in_chans)


@dataclass
class TrainingSetup:
    name: str
    config: Config
    stage: StageConfig | StudentConfig
    run: RunDir
    data: DataInfo
    accelerator: Accelerator
    model: torch.nn.Module
    labeled: ImageSet
    test: ImageSet
    holdout: ImageSet | None  # for tuning without looking at test; None when the import has no holdout
    mean: tuple[float, ...]
    std: tuple[float, ...]
    policy: Transform
    eval_transform: Transform
    channels_last: bool
    workers: int
    fingerprint_inputs: dict
    init: InitOutcome  # where the weights started
    started: float = field(default_factory=time.time)

    def device_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        return torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device)

    def test_logits(self) -> np.ndarray:
        return self.logits(self.test, "test")

    def logits(self, images: ImageSet, split: str) -> np.ndarray:
        return predict_logits(self.accelerator, self.model, images.images,
                              self.eval_transform, torch.tensor(self.mean), torch.tensor(self.std),
                              self.stage.train.eval_batch_size, self.workers, self.channels_last,
                              desc=f"{self.name} eval {split}", progress=self.config.runtime.progress)

    def checkpoint_test_logits(self, directory: Path) -> np.ndarray:
        """Test logits of another checkpoint (the round's teacher) through its own preprocessing."""
        return self.checkpoint_logits(directory, self.test, "test")

    def checkpoint_logits(self, directory: Path, images: ImageSet, split: str) -> np.ndarray:
        """Logits of another checkpoint on `images` through its own preprocessing (input size, mean/std)."""
        return checkpoint_logits(self.accelerator, directory, self.data.num_classes, images.images,
                                 self.stage.train.eval_batch_size, self.workers, self.channels_last,
                                 desc=f"{self.name} eval {split} ({directory.name})", progress=self.config.runtime.progress)

    def holdout_metrics(self) -> dict:
        """Top-1/ECE/NLL on the holdout split (what tuning should look at), {} without one."""
        if self.holdout is None:
            return {}
        found = classification_metrics(self.logits(self.holdout, "holdout"), self.holdout.labels, self.data.classes)
        return {"holdout": {k: found[k] for k in ("top1", "ece", "nll")} | {"num_holdout": len(self.holdout)}}


def setup_training(config: Config, run: RunDir, data: DataInfo, stage: StageConfig | StudentConfig, name: str,
                   extra_fingerprint: dict | None = None, teacher_dir: Path | None = None) -> TrainingSetup:
    configure_threads(config.runtime)
    torch.manual_seed(config.seed)
    labeled = load_labeled_split(data, "labeled")
    test = load_labeled_split(data, "test")
    holdout = load_labeled_split(data, "holdout") if data.count("holdout") else None
    mean, std = channel_stats(labeled.images)
    policy = build_policy(stage.train.policy, stage.model.input_size)
    inputs = {**training_fingerprint_inputs(stage, config.seed, data), **(extra_fingerprint or {})}
    accelerator = make_accelerator(config.runtime, run.logs_dir(), name, {"policy": str(policy), **_flat(inputs)})
    channels_last = use_channels_last(config.runtime)
    model, init = build_model(stage, data, resolve_init(stage.model.init, teacher_dir, run))
    if not init.source.is_random:
        origin = "" if init.growth is not None else f" init from {init.source.text}:"
        accelerator.print(f"[{name}] {stage.model.arch}{origin} {init.describe()}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return TrainingSetup(name, config, stage, run, data, accelerator, model, labeled, test, holdout, mean, std, policy,
                         build_eval_transform(stage.model.input_size), channels_last,
                         loader_workers(config.runtime), inputs, init)


def swap_in_ema(setup: TrainingSetup, result: TrainResult, trained: torch.nn.Module | None = None) -> dict:
    """With `train.ema_decay`: measure the last weights, then load the average (evaluated and exported).
    `trained`: the module `train` averaged when it is not the stage's model alone (a student with its
    mutual-learning peer)."""
    if result.ema is None:
        return {}
    raw = classification_metrics(setup.test_logits(), setup.test.labels, setup.data.classes)
    held = setup.holdout_metrics().get("holdout", {})
    result.ema.copy_to(setup.accelerator.unwrap_model(trained or setup.model, keep_torch_compile=False))
    return {"ema": {"decay": result.ema.decay, "raw_top1": raw["top1"], "raw_ece": raw["ece"],
                    **({"raw_holdout_top1": held["top1"]} if held else {})}}


class TrainingDiverged(RuntimeError):
    """The trained weights hold NaN or infinite values: nothing is saved as done."""


def check_finite(model: torch.nn.Module, name: str) -> None:
    """A diverged run (bf16 overflow, too high a learning rate) saved NaN weights as DONE: its test top-1 could
    still look fine where the NaNs sat in unused taps, and the export failed later without naming them.
    Checked on every process (the weights are the same on each), so all stop together."""
    for tensor_name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise TrainingDiverged(f"[{name}] {tensor_name} holds {bad} NaN or infinite values after training (the "
                                   f"run diverged); nothing was saved as done. Rerun with --from {name} and a lower "
                                   "learning rate, or runtime.mixed_precision=no (bf16 on CPU: README, Benchmarks)")


def record_stage(setup: TrainingSetup, model: torch.nn.Module, metrics: dict, lineage: dict,
                 save: Callable[[Path, torch.nn.Module, CheckpointMeta], str] = save_checkpoint) -> None:
    """Main process: checkpoint (+ meta with lineage), metrics.json, DONE, training state dropped; all wait."""
    from pipeline.config.loading import fingerprint

    accelerator, data, stage, name = setup.accelerator, setup.data, setup.stage, setup.name
    check_finite(model, name)
    if accelerator.is_main_process:
        meta = CheckpointMeta(arch=stage.model.arch, num_classes=data.num_classes, in_chans=data.in_chans,
                              input_size=stage.model.input_size, mean=setup.mean, std=setup.std,
                              class_names=tuple(data.classes), config_hash=fingerprint(setup.fingerprint_inputs),
                              lineage={"stage": name, "init": init_lineage(setup.init.source), **lineage})
        save(setup.run.checkpoint_dir(name), model, meta)
        setup.run.write_metrics(name, metrics)
        setup.run.mark_done(name)
        setup.run.drop_training_state(name)
    accelerator.wait_for_everyone()
    end_trackers(accelerator)  # not accelerator.end_training(): the process group belongs to the runner


def finish(setup: TrainingSetup, result: TrainResult, lineage: dict, extra_metrics: dict | None = None,
           logits: np.ndarray | None = None,
           save: Callable[[Path, torch.nn.Module, CheckpointMeta], str] = save_checkpoint) -> dict:
    """Evaluate on the test split, export checkpoint + metrics.json, mark done."""
    accelerator, data, stage, name = setup.accelerator, setup.data, setup.stage, setup.name
    if logits is None:
        logits = setup.test_logits()
    metrics = classification_metrics(logits, setup.test.labels, data.classes)
    metrics.update({
        "stage": name, "arch": stage.model.arch, "policy": str(parse_policy(stage.train.policy)),
        "epochs": stage.train.epochs, "steps": result.steps,
        "resumed_from_step": result.resumed_from, "num_labeled": len(setup.labeled),
        "train_seconds": round(result.seconds, 2), "train_images_per_s": round(result.images_per_s, 1),
        "data_wait_fraction": round(result.data_wait_fraction, 4), "final_losses": result.last_losses,
        "wall_seconds": round(time.time() - setup.started, 2), "channels_last": setup.channels_last,
        "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
        "drop_rate": stage.model.drop_rate, "drop_path_rate": stage.model.drop_path_rate,
        "init": setup.init.metrics(),
        **setup.holdout_metrics(), **(extra_metrics or {}), "loss_history": result.history,
    })
    record_stage(setup, accelerator.unwrap_model(setup.model, keep_torch_compile=False), metrics, lineage, save)
    held = f"  holdout top-1 {metrics['holdout']['top1']:.4f}" if "holdout" in metrics else ""
    accelerator.print(f"[{name}] test top-1 {metrics['top1']:.4f}  ECE {metrics['ece']:.4f}{held}  "
                      f"({metrics['wall_seconds']:.0f} s) -> {setup.run.metrics_path(name)}")
    return metrics


def end_trackers(accelerator: Accelerator) -> None:
    for tracker in accelerator.trackers:
        tracker.finish()


def _flat(obj: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
    return out
