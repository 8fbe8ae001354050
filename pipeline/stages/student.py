"""Stage `student_r{i}`: a noised student on labeled + pseudo-labeled data (Noisy Student).

Reads: labeled/test shards, unlabeled shards joined by `__key__` with the round's
sidecars (`pseudo_label_r{i}`) and plan (`select_r{i}`), the round's teacher
checkpoint (for agreement and lineage).
Writes: like the teacher (checkpoint, metrics.json with both loss terms over
time, DONE). Each step feeds B labeled and r*B unlabeled images through the
policy (default S4), with dropout and stochastic depth from the config.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from pipeline.config.schema import to_dict
from pipeline.core.atomic import read_json, sha256_file
from pipeline.data.imageset import DataInfo
from pipeline.data.loader import AugmentedSources, Batch, Source, StepBatchSampler, make_loader, to_model_input
from pipeline.data.pool import LabelForm, load_selected_pool
from pipeline.data.pool_stream import PoolStream, pool_shards
from pipeline.data.pool_stream_loader import (PoolPosition, StreamedMixtureSampler, StreamedSources, collate_mixed,
                                              tracked)
from pipeline.engine.init import init_content_inputs
from pipeline.engine.trainer import train
from pipeline.engine.training import finish, setup_training, swap_in_ema, training_fingerprint_inputs
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.pseudo_label import verify_sidecars
from students.losses import LossBalance
from students.mixture import mixture_loss
from teachers.checkpoint import checkpoint_hash, read_meta
from teachers.models import create_model

LABELED, UNLABELED = 0, 1


def batch_loss(labels: torch.Tensor, targets: torch.Tensor | None, mean: torch.Tensor, std: torch.Tensor,
               device: torch.device, channels_last: bool, smoothing: float, balance: LossBalance):
    """One forward over the mixed batch, then the mixture loss; labels and targets are looked up by index
    (targets=None: the streamed pool's batches carry their own, `batch.targets`)."""
    labels = labels.to(device)
    targets = targets.to(device) if targets is not None else None

    def loss_fn(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(to_model_input(batch.images, mean, std, device, channels_last))
        source, index = batch.source.to(device), batch.index.to(device)
        is_labeled = source == LABELED
        pool_targets = targets if targets is not None else batch.targets.to(device)
        return mixture_loss(logits, is_labeled, labels[index[is_labeled]], pool_targets[index[~is_labeled]],
                            smoothing, balance)
    return loss_fn


def warn_if_smaller(student_arch: str, teacher_dir: Path, data: DataInfo, log) -> dict:
    """Noisy Student wants an equal-or-larger student; distillation into small models is another stage."""
    teacher = read_meta(teacher_dir)
    sizes = {arch: sum(p.numel() for p in create_model(arch, data.num_classes, data.in_chans).parameters())
             for arch in {student_arch, teacher.arch}}
    if sizes[student_arch] < sizes[teacher.arch]:
        log(f"warning: student {student_arch} ({sizes[student_arch]:,} parameters) is smaller than its teacher "
            f"{teacher.arch} ({sizes[teacher.arch]:,}); Noisy Student expects an equal-or-larger student")
    return {"student_params": sizes[student_arch], "teacher_params": sizes[teacher.arch]}


def pool_inputs(ctx: StageContext, stage: Stage) -> dict:
    """`{"pool_sha256": ...}` over the round's sidecars and selection plans: the pseudo-labeled pool the student
    trains on, so a selection redone with other settings is a changed input (a student left done while its
    round was out of the graph kept the old one). None for a record made before the key existed."""
    if not ctx.fingerprints(stage, "pool_sha256"):
        return {}
    digest = hashlib.sha256()
    for record in ctx.data().shard_records("unlabeled"):
        for path in (ctx.run.sidecar_path(stage.labels, record["name"]),
                     ctx.run.plan_path(stage.selection, record["name"])):
            digest.update(sha256_file(path).encode() if path.exists() else b"absent")
    return {"pool_sha256": digest.hexdigest()}


def inputs(ctx: StageContext, stage: Stage) -> dict:
    student = ctx.config.student
    return {"teacher_sha256": checkpoint_hash(ctx.teacher_dir(stage)), **pool_inputs(ctx, stage),
            **training_fingerprint_inputs(student, ctx.config.seed, ctx.data()),
            **init_content_inputs(student.model.init, ctx.fingerprints(stage, "init_sha256")),
            "student": {k: v for k, v in to_dict(student).items() if k not in ("model", "train", "rounds")
                        # the memory pool's results predate these keys: its fingerprint stays as it was
                        and not (student.pool == "memory" and k in ("pool", "shuffle_buffer"))}}


def run(ctx: StageContext, this: Stage) -> dict:
    config, run, data, name = ctx.config, ctx.run, ctx.data(), this.name
    round_index, teacher_dir = this.round, ctx.teacher_dir(this)
    labels_stage, select_stage = this.labels, this.selection
    cfg = config.student
    stage = cfg  # StudentConfig carries model + train like a StageConfig
    select = read_json(run.metrics_path(select_stage))
    extra = {"round": round_index, "teacher_sha256": checkpoint_hash(teacher_dir),
             "unlabeled_ratio": cfg.unlabeled_ratio, "pseudo_weight": cfg.pseudo_weight,
             "loss_balance": cfg.loss_balance, "labels": select["labels"],
             "label_temperature": select["label_temperature"]}
    setup = setup_training(config, run, data, stage, name, extra, teacher_dir)
    accelerator = setup.accelerator
    sizes = warn_if_smaller(cfg.model.arch, teacher_dir, data, accelerator.print)
    verify_sidecars(run, data, labels_stage, extra["teacher_sha256"])
    form = LabelForm.from_select_metrics(select)
    batch = cfg.train.batch_size
    # labeled rows a step capped at the labeled set's size, as the teacher's batch is: a smaller labeled set
    # is not drawn twice within a step (compare's arms with and without self-training see equal labeled rows)
    labeled_batch = min(batch, len(setup.labeled))
    labeled = Source(np.arange(len(setup.labeled)), labeled_batch)
    balance = LossBalance(cfg.pseudo_weight, cfg.loss_balance)
    mean, std = setup.device_stats()
    extra_state: list = [balance]
    if cfg.pool == "streamed":
        shards = pool_shards(data, run, labels_stage, select_stage)
        num_unique, num_copies, targets = sum(s.kept for s in shards), sum(s.copies for s in shards), None
        stream_dataset = StreamedSources(setup.labeled.images, setup.policy, data.mode)
        position = PoolPosition()
        extra_state.append(position)
    else:
        pool = load_selected_pool(data, run, labels_stage, select_stage, form, config.runtime.progress)
        population = pool.population()
        num_unique, num_copies, targets = len(pool.images), len(population), torch.from_numpy(pool.targets)
        sources = [labeled, Source(population, batch * cfg.unlabeled_ratio)]
        dataset = AugmentedSources([setup.labeled.images, pool.images], setup.policy)
    steps_per_epoch = math.ceil(num_copies / (batch * cfg.unlabeled_ratio))
    total_steps = cfg.train.total_steps(steps_per_epoch)
    accelerator.print(f"[{name}] {cfg.model.arch} (drop {cfg.model.drop_rate}, drop-path {cfg.model.drop_path_rate}) "
                      f"on {len(setup.labeled)} labeled + {num_unique} pseudo-labeled images "
                      f"({num_copies} with copies, {cfg.pool}), ratio 1:{cfg.unlabeled_ratio}, "
                      f"policy {setup.policy!r}, {total_steps} steps")

    def batches(start: int):
        if cfg.pool == "streamed":
            stream = PoolStream(shards, form, config.seed, cfg.shuffle_buffer, data.image_keys,
                                accelerator.process_index, accelerator.num_processes)
            sampler = StreamedMixtureSampler(labeled, stream, batch * cfg.unlabeled_ratio, total_steps,
                                             config.seed, position, start)
            return tracked(make_loader(stream_dataset, sampler, setup.workers, config.seed, collate_mixed),
                           position, start)
        sampler = StepBatchSampler(sources, total_steps, config.seed, start,
                                   accelerator.process_index, accelerator.num_processes)
        return make_loader(dataset, sampler, setup.workers, config.seed)

    loss_fn = batch_loss(torch.from_numpy(setup.labeled.labels), targets, mean, std,
                         accelerator.device, setup.channels_last, cfg.train.label_smoothing, balance)
    result = train(accelerator, setup.model, cfg.train, total_steps, steps_per_epoch, batches, loss_fn,
                   state_dir=run.state_dir(name), name=name, progress=config.runtime.progress,
                   extra_state=extra_state)
    ema = swap_in_ema(setup, result)
    logits = setup.test_logits()
    teacher_logits = setup.checkpoint_test_logits(teacher_dir)
    agreement = float((logits.argmax(1) == teacher_logits.argmax(1)).mean())
    lineage = {"round": round_index, "teacher": str(teacher_dir), "teacher_sha256": extra["teacher_sha256"],
               "labels": labels_stage, "selection": select_stage}
    metrics = {**extra, **sizes, **ema, "teacher_agreement": agreement, "num_pseudo_unique": num_unique,
               "num_pseudo_with_copies": int(num_copies), "steps_per_epoch": steps_per_epoch, "pool": cfg.pool,
               "labeled_batch": labeled_batch, "pseudo_batch": batch * cfg.unlabeled_ratio}
    return finish(setup, result, lineage, metrics, logits=logits)
