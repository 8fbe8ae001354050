"""Stage `teacher`: train a timm model on the labeled shards, evaluate, export.

Reads: data manifest + labeled and test shards, config `teacher` section.
Writes: teacher/checkpoint/{model.safetensors,meta.json}, teacher/metrics.json,
teacher/state/ (while training; resumable), teacher/DONE.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config.sections import Config, StageConfig
from pipeline.core.rundir import RunDir
from pipeline.data.imageset import DataInfo
from pipeline.data.loader import AugmentedSources, Batch, Source, StepBatchSampler, make_loader, to_model_input
from pipeline.engine.init import init_content_inputs
from pipeline.engine.trainer import train
from pipeline.engine.training import finish, setup_training, swap_in_ema, training_fingerprint_inputs
from pipeline.stages.base import Stage, StageContext


def supervised_loss(labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                    channels_last: bool, smoothing: float):
    """Cross-entropy with label smoothing; labels are looked up by dataset index (not sent through workers)."""
    labels = labels.to(device)

    def loss_fn(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(to_model_input(batch.images, mean, std, device, channels_last))
        return {"loss": F.cross_entropy(logits, labels[batch.index.to(device)], label_smoothing=smoothing)}
    return loss_fn


def inputs(ctx: StageContext, stage: Stage) -> dict:
    return {**training_fingerprint_inputs(ctx.config.teacher, ctx.config.seed, ctx.data()),
            **init_content_inputs(ctx.config.teacher.model.init, ctx.fingerprints(stage, "init_sha256"))}


def run(ctx: StageContext, this: Stage) -> dict:
    return train_supervised(ctx.config, ctx.run, ctx.data(), ctx.config.teacher, this.name)


def train_supervised(config: Config, run: RunDir, data: DataInfo, stage: StageConfig, name: str) -> dict:
    """Cross-entropy training on `data`'s labeled split; the teacher stage and supervised pretraining."""
    setup = setup_training(config, run, data, stage, name)
    accelerator, labeled = setup.accelerator, setup.labeled
    global_batch = min(stage.train.batch_size, len(labeled))
    steps_per_epoch = math.ceil(len(labeled) / global_batch)  # an epoch is one pass over the labeled set
    total_steps = stage.train.total_steps(steps_per_epoch)
    accelerator.print(f"[{name}] {stage.model.arch} on {len(labeled)} labeled images, policy {setup.policy!r}, "
                      f"{total_steps} steps")
    dataset = AugmentedSources([labeled.images], setup.policy)
    sources = [Source(np.arange(len(labeled)), global_batch)]

    def batches(start: int):
        sampler = StepBatchSampler(sources, total_steps, config.seed, start,
                                   accelerator.process_index, accelerator.num_processes)
        return make_loader(dataset, sampler, setup.workers, config.seed)

    mean, std = setup.device_stats()
    loss_fn = supervised_loss(torch.from_numpy(labeled.labels), mean, std, accelerator.device,
                              setup.channels_last, stage.train.label_smoothing)
    result = train(accelerator, setup.model, stage.train, total_steps, steps_per_epoch, batches, loss_fn,
                   state_dir=run.state_dir(name), name=name, progress=config.runtime.progress)
    lineage = {"labeled_shards": [r["sha256"] for r in data.manifest["splits"]["labeled"]["shards"]]}
    return finish(setup, result, lineage, {**swap_in_ema(setup, result), "labeled_batch": global_batch})
