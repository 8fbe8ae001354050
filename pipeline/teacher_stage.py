"""Stage `teacher`: train a timm model on the labeled shards, evaluate, export.

Reads: data manifest + labeled and test shards, config `teacher` section.
Writes: teacher/checkpoint/{model.safetensors,meta.json}, teacher/metrics.json,
teacher/state/ (resumable), teacher/DONE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from augment import build_eval_transform, build_policy, parse_policy
from pipeline.atomic import write_json
from pipeline.config import Config, StageConfig, fingerprint
from pipeline.configschema import to_dict
from pipeline.imageset import DataInfo, channel_stats, load_labeled_split
from pipeline.loader import AugmentedImages, StepBatchSampler, make_loader, to_model_input
from pipeline.metrics import classification_metrics
from pipeline.predict import predict_logits
from pipeline.rundir import RunDir
from pipeline.runtime import configure_threads, loader_workers, make_accelerator, use_channels_last
from pipeline.trainer import train
from teachers.checkpoint import CheckpointMeta, check_compatible, load_weights_into, read_meta, save_checkpoint
from teachers.models import create_model

NOT_RESULT_AFFECTING = ("save_every_steps", "eval_batch_size")


@dataclass(frozen=True)
class StageInputs:
    config: Config
    run: RunDir
    data: DataInfo


def training_fingerprint_inputs(stage: StageConfig, seed: int, data: DataInfo) -> dict:
    """What a trained model depends on (runtime and save cadence excluded)."""
    train = {k: v for k, v in to_dict(stage.train).items() if k not in NOT_RESULT_AFFECTING}
    train["policy"] = str(parse_policy(stage.train.policy))
    return {"model": to_dict(stage.model), "train": train, "seed": seed,
            "data_manifest": data.manifest["splits"]["labeled"]["shards"]}


def supervised_loss(mean: torch.Tensor, std: torch.Tensor, device: torch.device, channels_last: bool,
                    smoothing: float):
    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = model(to_model_input(images, mean, std, device, channels_last))
        return {"loss": F.cross_entropy(logits, labels.to(device), label_smoothing=smoothing)}
    return loss_fn


def build_model(stage: StageConfig, data: DataInfo) -> torch.nn.Module:
    model = create_model(stage.model.arch, data.num_classes, data.in_chans,
                         stage.model.drop_rate, stage.model.drop_path_rate)
    if stage.model.init:
        meta = read_meta(Path(stage.model.init))
        check_compatible(meta, stage.model.arch, data.num_classes, f"model.init {stage.model.init}")
        load_weights_into(model, Path(stage.model.init))
    return model


def run_teacher(inputs: StageInputs, name: str = "teacher") -> dict:
    config, run, data = inputs.config, inputs.run, inputs.data
    stage = config.teacher
    record_inputs = training_fingerprint_inputs(stage, config.seed, data)
    configure_threads(config.runtime)
    torch.manual_seed(config.seed)
    started = time.time()

    labeled = load_labeled_split(data, "labeled")
    test = load_labeled_split(data, "test")
    mean_t, std_t = channel_stats(labeled.images)
    mean, std = torch.tensor(mean_t), torch.tensor(std_t)
    policy = build_policy(stage.train.policy, stage.model.input_size)
    eval_tf = build_eval_transform(stage.model.input_size)
    channels_last = use_channels_last(config.runtime)
    workers = loader_workers(config.runtime)

    accelerator = make_accelerator(config.runtime, run.logs_dir(), name,
                                   {"policy": str(policy), **_flat(record_inputs)})
    accelerator.print(f"[{name}] {stage.model.arch} on {len(labeled)} labeled images, policy {policy!r}")
    model = build_model(stage, data)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    global_batch = min(stage.train.batch_size, len(labeled))
    per_rank = max(1, global_batch // accelerator.num_processes)
    steps_per_epoch = max(1, len(labeled) // global_batch)
    total_steps = stage.train.epochs * steps_per_epoch
    dataset = AugmentedImages(labeled.images, labeled.labels, policy)

    def batches(start: int):
        sampler = StepBatchSampler(len(labeled), per_rank * accelerator.num_processes, total_steps,
                                   config.seed, start, accelerator.process_index, accelerator.num_processes)
        return make_loader(dataset, sampler, workers, config.seed)

    result = train(accelerator, model, stage.train, total_steps, steps_per_epoch, batches,
                   supervised_loss(mean.to(accelerator.device), std.to(accelerator.device),
                                   accelerator.device, channels_last, stage.train.label_smoothing),
                   count=lambda batch: len(batch[1]), state_dir=run.state_dir(name), name=name,
                   progress=config.runtime.progress)

    logits = predict_logits(accelerator, model, test.images, eval_tf, mean, std,
                            stage.train.eval_batch_size, workers, channels_last,
                            desc=f"{name} eval", progress=config.runtime.progress)
    metrics = classification_metrics(logits, test.labels, data.classes)
    unwrapped = accelerator.unwrap_model(model)
    metrics.update({
        "stage": name, "arch": stage.model.arch, "policy": str(policy), "epochs": stage.train.epochs,
        "steps": result.steps, "resumed_from_step": result.resumed_from, "num_labeled": len(labeled),
        "train_seconds": round(result.seconds, 2), "train_images_per_s": round(result.images_per_s, 1),
        "data_wait_fraction": round(result.data_wait_fraction, 4), "final_losses": result.last_losses,
        "wall_seconds": round(time.time() - started, 2), "channels_last": channels_last,
        "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
    })
    if accelerator.is_main_process:
        meta = CheckpointMeta(arch=stage.model.arch, num_classes=data.num_classes, in_chans=data.in_chans,
                              input_size=stage.model.input_size, mean=mean_t, std=std_t,
                              class_names=tuple(data.classes), config_hash=fingerprint(record_inputs),
                              lineage={"stage": name, "init": stage.model.init,
                                       "labeled_shards": [r["sha256"] for r in data.manifest["splits"]["labeled"]["shards"]]})
        save_checkpoint(run.checkpoint_dir(name), unwrapped, meta)
        write_json(run.metrics_path(name), metrics)
        run.mark_done(name)
        run.drop_training_state(name)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"[{name}] test top-1 {metrics['top1']:.4f}  ECE {metrics['ece']:.4f}  "
                      f"({metrics['wall_seconds']:.0f} s) -> {run.metrics_path(name)}")
    return metrics


def _flat(obj: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
    return out
