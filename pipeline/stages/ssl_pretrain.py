"""Stage `ssl_pretrain`: SimCLR on the unlabeled pool (Zoph et al. 2020's self-supervised comparison).

Reads: the unlabeled shards (decoded into memory, skip-and-count), the labeled and test splits
(only for the k-NN probe that is reported), the teacher's architecture and input size.
Writes: ssl_pretrain/checkpoint/ (the backbone; its classifier was never trained and is
re-initialised by whoever starts from it), metrics.json (NT-Xent over time, k-NN top-1), DONE.
Each step draws two views of every image from `ssl_pretrain.train.policy`; under several
processes every rank's embeddings are gathered, so each anchor meets the whole global batch's negatives.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from pipeline.config.schema import to_dict
from pipeline.config.sections import Config, StageConfig
from pipeline.data.imageset import load_unlabeled_split
from pipeline.data.loader import AugmentedSources, Batch, Source, StepBatchSampler, make_loader, to_model_input
from pipeline.engine.predict import predict_logits
from pipeline.engine.trainer import train
from pipeline.engine.training import TrainingSetup, record_stage, setup_training, training_fingerprint_inputs
from pipeline.stages.base import Stage, StageContext
from students.simclr import PooledFeatures, SimCLRModel, gather_rows, knn_top1, nt_xent_loss
from teachers.models import ModelError

VIEW_SEED_OFFSET = 1_000_003  # the second view's augmentation seed, independent of the first


class TwoViews:
    """Two independent draws of a policy, stacked along the channel axis (H x W x 2C) so that one
    loader item carries both views."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        return np.concatenate([self.policy(image, seed=seed), self.policy(image, seed=seed + VIEW_SEED_OFFSET)],
                              axis=2)


def ssl_stage_config(config: Config) -> StageConfig:
    return StageConfig(model=dataclasses.replace(config.teacher.model, init=None), train=config.ssl_pretrain.train)


def inputs(ctx: StageContext, stage: Stage) -> dict:
    cfg = ctx.config.ssl_pretrain
    record = training_fingerprint_inputs(ssl_stage_config(ctx.config), ctx.config.seed, ctx.data())
    return {**record, "unlabeled_shards": [r["sha256"] for r in ctx.data().shard_records("unlabeled")],
            "simclr": {k: v for k, v in to_dict(cfg).items() if k not in ("train", "enabled", "knn_k")}}


def contrastive_loss(mean: torch.Tensor, std: torch.Tensor, device: torch.device, channels_last: bool,
                     temperature: float):
    channels = len(mean)

    def loss_fn(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x = to_model_input(batch.images, mean.repeat(2), std.repeat(2), device, channels_last)
        views = torch.cat([x[:, :channels], x[:, channels:]])
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        z1, z2 = model(views).chunk(2)
        # every process's embeddings: each anchor meets the whole global batch's negatives, as in one process
        return {"loss": nt_xent_loss(gather_rows(z1), gather_rows(z2), temperature)}
    return loss_fn


def probe(setup: TrainingSetup, backbone: torch.nn.Module, k: int) -> float:
    """k-NN top-1 of the pooled features: labeled split as memory, test split as queries."""
    features = PooledFeatures(backbone)
    mean, std = torch.tensor(setup.mean), torch.tensor(setup.std)
    found = [predict_logits(setup.accelerator, features, images.images, setup.eval_transform, mean, std,
                            setup.stage.train.eval_batch_size, setup.workers, setup.channels_last,
                            desc=f"{setup.name} features {split}", progress=setup.config.runtime.progress)
             for split, images in (("labeled", setup.labeled), ("test", setup.test))]
    return knn_top1(found[0], setup.labeled.labels, found[1], setup.test.labels, k, setup.data.num_classes)


def run(ctx: StageContext, this: Stage) -> dict:
    config, run, data, name, cfg = ctx.config, ctx.run, ctx.data(), this.name, ctx.config.ssl_pretrain
    stage = ssl_stage_config(config)
    setup = setup_training(config, run, data, stage, name)
    accelerator, backbone = setup.accelerator, setup.model
    if not hasattr(backbone, "forward_head"):
        raise ModelError(f"ssl_pretrain: {stage.model.arch} has no timm forward_features/forward_head; "
                         "SimCLR needs a timm architecture")
    model = SimCLRModel(backbone, cfg.hidden_dim, cfg.projection_dim)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pool, problems = load_unlabeled_split(data)
    global_batch = min(stage.train.batch_size, len(pool.images))
    steps_per_epoch = math.ceil(len(pool.images) / global_batch)
    total_steps = stage.train.total_steps(steps_per_epoch)
    accelerator.print(f"[{name}] SimCLR {stage.model.arch} on {len(pool.images)} unlabeled images, two views from "
                      f"{setup.policy!r}, {global_batch} pairs a step, {total_steps} steps")
    dataset = AugmentedSources([pool.images], TwoViews(setup.policy))
    sources = [Source(np.arange(len(pool.images)), global_batch)]

    def batches(start: int):
        sampler = StepBatchSampler(sources, total_steps, config.seed, start,
                                   accelerator.process_index, accelerator.num_processes)
        return make_loader(dataset, sampler, setup.workers, config.seed)

    mean, std = setup.device_stats()
    loss_fn = contrastive_loss(mean, std, accelerator.device, setup.channels_last, cfg.temperature)
    result = train(accelerator, model, stage.train, total_steps, steps_per_epoch, batches, loss_fn,
                   state_dir=run.state_dir(name), name=name, progress=config.runtime.progress)
    if result.ema is not None:  # the averaged backbone (and head) is probed and saved
        result.ema.copy_to(model)
    knn = probe(setup, backbone, cfg.knn_k)
    metrics = {"stage": name, "arch": stage.model.arch, "method": "simclr", "policy": str(setup.policy),
               "steps": result.steps, "resumed_from_step": result.resumed_from, "pairs_per_step": global_batch,
               "temperature": cfg.temperature, "num_unlabeled": len(pool.images),
               "unreadable_samples": len(problems.skipped), "knn_top1": knn, "knn_k": cfg.knn_k,
               "train_seconds": round(result.seconds, 2), "train_images_per_s": round(result.images_per_s, 1),
               "wall_seconds": round(time.time() - setup.started, 2), "num_processes": accelerator.num_processes,
               "final_losses": result.last_losses, "loss_history": result.history,
               **({"ema": {"decay": result.ema.decay}} if result.ema is not None else {})}
    lineage = {"method": "simclr", "unlabeled_shards": [r["sha256"] for r in data.shard_records("unlabeled")]}
    record_stage(setup, backbone, metrics, lineage)
    accelerator.print(f"[{name}] k-NN top-1 of the features {knn:.4f} ({metrics['wall_seconds']:.0f} s)")
    return metrics
