"""Stage `distill_<arch>`: Hinton KD of the final self-trained model into one small student.

Reads: labeled/test (and holdout) splits, the unlabeled pool decoded into memory (skip-and-count),
the teacher checkpoint (the last self-training round, or `distill.teacher`); offline mode also the
teacher's pseudo-label sidecars.
Writes: like every training stage (checkpoint, metrics.json with agreement with the teacher, DONE),
resumable from `state/`.

Consistent teaching (online, default): every step draws `labeled_batch` labeled and
`train.batch_size` unlabeled images, augments each once at the student's input size, and the
teacher (eval mode, no_grad) sees exactly that view resized to its own input size with its own
normalisation (students/kd_teacher.py; `distill.ensemble`: several teachers, averaged).
Optional mixup mixes the shared view before both see it ("function matching",
Beyer et al. 2022; mixed rows give the KD term only). Offline: the teacher's logits of the clean
view come from the sidecars (unlabeled) and one eval pass (labeled).

Mutual learning (`distill.mutual.weight` > 0, Zhang et al. 2018): a peer trains alongside on the
same views and each student also distils from the other (students/mutual.py); the stage ships its
student and writes the peer to RUN/<stage>/peer/ with its top-1 in metrics.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.config.schema import to_dict
from pipeline.config.loading import fingerprint
from pipeline.config.sections import Config, ModelConfig, StageConfig
from pipeline.core.rundir import RunDirError
from pipeline.data.imageset import ImageSet, load_unlabeled_split
from pipeline.data.loader import AugmentedSources, Batch, Source, StepBatchSampler, make_loader
from pipeline.data.pool_stream import LOGITS, PoolShard, PoolStream, distill_shards
from pipeline.data.pool_stream_loader import (MixedBatch, PoolPosition, StreamedMixtureSampler, StreamedSources,
                                              collate_mixed, tracked)
from pipeline.engine.trainer import train
from pipeline.engine.init import init_content_inputs, resolve_init
from pipeline.engine.predict import load_model, predict_logits
from pipeline.engine.training import (TrainingSetup, build_model, finish, setup_training, swap_in_ema,
                                      training_fingerprint_inputs)
from pipeline.stages.base import Stage, StageContext
from students.kd_teacher import EnsembleTeacher, TeacherView, mean_softened
from students.losses import IGNORE_LABEL, distillation_loss
from students.mutual import MutualPair, mutual_distillation_loss
from teachers.checkpoint import CheckpointMeta, check_teachers_classes, checkpoint_hash, save_checkpoint
from teachers.sidecar import Sidecar, read_sidecar

LABELED, UNLABELED = 0, 1


def student_stage_config(config: Config, student: ModelConfig) -> StageConfig:
    """The student as a training stage: its model from the distill entry, training from `distill.train`."""
    return StageConfig(model=student, train=config.distill.train)


def kd_settings(config: Config) -> dict:
    found = {k: v for k, v in to_dict(config.distill).items() if k not in ("students", "teacher", "ensemble", "prune",
                                                                         "export", "train")}
    # options at their off value leave the fingerprint of runs made before they existed as it was
    if not config.distill.mutual.weight:
        found.pop("mutual")
    if config.distill.pool == "memory":
        found.pop("pool")
        found.pop("shuffle_buffer")
    return found


def peer_config(config: Config, student: ModelConfig) -> ModelConfig:
    """The mutual-learning peer of `student`: `distill.mutual.peer`, or the student's own model config
    (same arch, drop rates and init: from random init the two start from different weights)."""
    return config.distill.mutual.peer or student


def teacher_inputs(ctx: StageContext, stage: Stage) -> dict:
    """The teacher's checkpoint hash (and its ensemble members', when there are any) and the KD settings."""
    found = {"teacher_sha256": checkpoint_hash(ctx.teacher_dir(stage)), "kd": kd_settings(ctx.config)}
    if ctx.config.distill.ensemble:  # absent when off: fingerprints of runs made before it stay as they were
        found["ensemble_sha256"] = [checkpoint_hash(Path(member)) for member in ctx.config.distill.ensemble]
    return found


def inputs(ctx: StageContext, stage: Stage) -> dict:
    peer = ctx.config.distill.mutual.peer if ctx.config.distill.mutual.weight > 0 else None
    return {**teacher_inputs(ctx, stage),
            **training_fingerprint_inputs(student_stage_config(ctx.config, stage.spec), ctx.config.seed, ctx.data()),
            **init_content_inputs(stage.spec.init, ctx.fingerprints(stage, "init_sha256")),
            **init_content_inputs(peer and peer.init, ctx.fingerprints(stage, "peer_init_sha256"), "peer_init_sha256")}


def mixup_view(view01: torch.Tensor, batch: Batch, alpha: float) -> tuple[torch.Tensor, bool]:
    """Mix the batch with a permutation of itself; lambda and the permutation come from the batch's
    own rows in their order (streamed: and pixels), so a resumed run draws the same ones, and a step that
    draws the whole pool (the same rows each step, in another order) draws another lambda."""
    if alpha <= 0 or len(batch) < 2:
        return view01, False
    rows = (batch.source.to(torch.int64) << 40) | batch.index.to(torch.int64)
    entropy = [int(row) for row in rows.tolist()]
    if isinstance(batch, MixedBatch):  # streamed rows are numbered within the batch: add the images' content
        entropy.append(int(batch.images.to(torch.int64).sum()))
    rng = np.random.default_rng(entropy)
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(batch))).to(view01.device)
    return lam * view01 + (1 - lam) * view01[perm], True


def full_logits_sidecar(path: Path, labels_stage: str) -> Sidecar:
    """The sidecar at `path`, refused when missing or when it keeps only the top-k logits."""
    if not path.exists():
        raise RunDirError(f"distill.mode offline: no sidecar {path}; rerun --from {labels_stage}")
    sidecar = read_sidecar(path)
    if sidecar.is_topk:
        raise RunDirError(f"distill.mode offline needs full logits in the sidecars of {labels_stage}; "
                          "these keep only the top-k (many classes): use distill.mode online")
    return sidecar


def offline_teacher_logits(ctx: StageContext, stage: Stage, labeled_logits: np.ndarray,
                           unlabeled: ImageSet) -> torch.Tensor:
    """(L + U, C) teacher logits of the clean views: labeled rows, then the unlabeled pool in its order."""
    rows = {}
    for record in ctx.data().shard_records("unlabeled"):
        sidecar = full_logits_sidecar(ctx.run.sidecar_path(stage.labels, record["name"]), stage.labels)
        for key, row in zip(sidecar.keys, sidecar.full_logits()):
            rows.setdefault(str(key), row)  # a key met again in a later shard: its first image is the one kept
    missing = [k for k in unlabeled.keys if k not in rows]
    if missing:
        raise RunDirError(f"{len(missing)} unlabeled images have no logits in {ctx.run.stage_dir(stage.labels)} "
                          f"(e.g. '{missing[0]}'); rerun --from {stage.labels}")
    table = np.concatenate([labeled_logits, np.stack([rows[k] for k in unlabeled.keys]).astype(np.float32)])
    return torch.from_numpy(table)


def stored_logits(offline: torch.Tensor, num_labeled: int, batch: Batch, source: torch.Tensor,
                  index: torch.Tensor) -> torch.Tensor:
    """Offline teacher logits of the batch's rows: labeled rows from the table's first `num_labeled`
    rows; unlabeled rows from the rest of the table (memory pool) or from the batch (streamed pool)."""
    streamed = getattr(batch, "targets", None)
    unlabeled = offline[num_labeled:] if streamed is None else streamed.to(offline.device)
    target = torch.empty(len(index), offline.shape[1], device=offline.device)
    is_labeled = source == LABELED
    target[is_labeled] = offline[index[is_labeled]]
    target[~is_labeled] = unlabeled[index[~is_labeled]]
    return target


def kd_loss_fn(ctx: StageContext, setup: TrainingSetup, teacher: TeacherView | EnsembleTeacher, labels: torch.Tensor,
               offline: torch.Tensor | None, num_labeled: int, mutual_weight: float = 0.0):
    """One forward of the student on the shared view, the teacher on the same view (or stored logits).
    `mutual_weight` > 0: the model is a `MutualPair` and both students learn (students/mutual.py)."""
    cfg = ctx.config.distill
    device = setup.accelerator.device
    mean, std = (t.view(1, -1, 1, 1) for t in setup.device_stats())
    labels = labels.to(device)
    offline = offline.to(device) if offline is not None else None

    def loss_fn(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        view = batch.images.to(device, non_blocking=True).float().div_(255.0)
        view, mixed = mixup_view(view, batch, cfg.mixup)
        x = ((view - mean) / std).contiguous(
            memory_format=torch.channels_last if setup.channels_last else torch.contiguous_format)
        source, index = batch.source.to(device), batch.index.to(device)
        if offline is None:
            with setup.accelerator.autocast():  # the student's precision: an fp32 teacher dominated a GPU step
                target = teacher(view)
        else:
            target = stored_logits(offline, num_labeled, batch, source, index)
        row_labels = torch.where(source == LABELED, labels[index.clamp_max(len(labels) - 1)],
                                 torch.full_like(index, IGNORE_LABEL))
        if mixed:
            row_labels = torch.full_like(index, IGNORE_LABEL)  # a mixed view has no single true class
        if mutual_weight > 0:
            student_logits, peer_logits = model(x)
            return mutual_distillation_loss(student_logits, peer_logits, target, row_labels, cfg.temperature,
                                            cfg.alpha, cfg.beta, mutual_weight, cfg.train.label_smoothing, cfg.hard)
        return distillation_loss(model(x), target, row_labels, cfg.temperature, cfg.alpha, cfg.beta,
                                 label_smoothing=cfg.train.label_smoothing, hard=cfg.hard)
    return loss_fn


@dataclass
class KDSetup:
    """What a KD training loop needs beyond the student: data sources, the loss, the teacher."""

    sources: list[Source]  # labeled, then (memory pool) unlabeled
    dataset: AugmentedSources | StreamedSources
    stream_shards: list[PoolShard] | None  # the streamed pool's shards; None: the pool is in `dataset`
    loss_fn: object
    teacher_dir: Path
    teacher_meta: CheckpointMeta
    ensemble_dirs: list[Path]  # the teacher's fellow ensemble members (empty: the teacher alone)
    num_unlabeled: int
    problems: dict
    steps_per_epoch: int
    streams: list[PoolStream] = field(default_factory=list)  # the streams made so far (their skip counts)

    def teacher_lineage(self) -> dict:
        """Where the teaching came from, for a checkpoint's lineage: the teacher and any ensemble members."""
        return {"teacher": str(self.teacher_dir),
                **({"ensemble": [str(d) for d in self.ensemble_dirs]} if self.ensemble_dirs else {})}

    def streamed_problems(self) -> dict:
        """Samples the streams of this process skipped (no image member, or offline no logits)."""
        return {"skipped_while_streaming": sum(s.skipped for s in self.streams)} if self.stream_shards else {}

    def batches(self, ctx: StageContext, setup: TrainingSetup, total_steps: int,
                offset: int = 0) -> tuple[Callable[[int], Iterable[Batch]], list]:
        """Loader factory for `train` (steps [offset + start, offset + total_steps) of the KD stream) and
        the state to save with it (the streamed pool's position)."""
        accelerator, seed = setup.accelerator, ctx.config.seed
        if self.stream_shards is None:
            def make(start: int):
                sampler = StepBatchSampler(self.sources, offset + total_steps, seed, offset + start,
                                           accelerator.process_index, accelerator.num_processes)
                return make_loader(self.dataset, sampler, setup.workers, seed)
            return make, []
        position, cfg = PoolPosition(), ctx.config.distill

        def make_streamed(start: int):
            stream = PoolStream(self.stream_shards, LOGITS, seed + offset, cfg.shuffle_buffer, ctx.data().image_keys,
                                accelerator.process_index, accelerator.num_processes)
            self.streams.append(stream)
            sampler = StreamedMixtureSampler(self.sources[0], stream, cfg.train.batch_size, total_steps, seed,
                                             position, start, labeled_offset=offset)
            return tracked(make_loader(self.dataset, sampler, setup.workers, seed, collate_mixed), position, start)
        return make_streamed, [position]


def unlabeled_pool(ctx: StageContext, this: Stage, setup: TrainingSetup
                   ) -> tuple[ImageSet | None, list[PoolShard] | None, int, dict]:
    """The pool in memory (skip-and-count), or its shards to stream; its size and read problems."""
    data = ctx.data()
    if ctx.config.distill.pool == "streamed":
        labels = this.labels if ctx.config.distill.mode == "offline" else None
        shards = distill_shards(data, ctx.run, labels)
        if not shards:
            raise RunDirError(f"[{this.name}] the unlabeled pool of {data.root} is empty: nothing to distill on")
        for shard in shards if labels else ():  # offline: every sidecar there, with full logits, before training
            full_logits_sidecar(shard.sidecar, labels)
        return None, shards, sum(s.copies for s in shards), {}
    unlabeled, problems = load_unlabeled_split(data)
    if not unlabeled.images:
        raise RunDirError(f"[{this.name}] the unlabeled pool of {data.root} has no readable image to distill on")
    return unlabeled, None, len(unlabeled), problems.as_dict()


def prepare_kd(ctx: StageContext, this: Stage, setup: TrainingSetup, mutual_weight: float = 0.0) -> KDSetup:
    """The unlabeled pool, the teacher on the student's view (or its stored logits), the KD loss
    (for a `MutualPair` when `mutual_weight` > 0)."""
    cfg = ctx.config.distill
    teacher_dir = ctx.teacher_dir(this)
    check_teachers_classes(cfg.given_checkpoints(), ctx.data().classes)  # preflight's too, once data is imported
    unlabeled, shards, num_unlabeled, problems = unlabeled_pool(ctx, this, setup)
    ensemble_dirs = [Path(member) for member in cfg.ensemble]
    loaded = [load_model(directory, ctx.data().num_classes) for directory in [teacher_dir, *ensemble_dirs]]
    views = [TeacherView(model, meta, setup.accelerator.device, setup.channels_last) for model, meta in loaded]
    teacher_meta = loaded[0][1]
    teacher = views[0] if len(views) == 1 else EnsembleTeacher(views, cfg.temperature)
    offline = None
    if cfg.mode == "offline":
        labeled_logits = setup.checkpoint_logits(teacher_dir, setup.labeled, "labeled")
        offline = (torch.from_numpy(labeled_logits) if unlabeled is None
                   else offline_teacher_logits(ctx, this, labeled_logits, unlabeled))
    sources = [Source(np.arange(len(setup.labeled)), cfg.labeled_batch)]
    if unlabeled is None:
        dataset = StreamedSources(setup.labeled.images, setup.policy, ctx.data().mode)
    else:
        sources.append(Source(np.arange(len(unlabeled)), cfg.train.batch_size))
        dataset = AugmentedSources([setup.labeled.images, unlabeled.images], setup.policy)
    loss_fn = kd_loss_fn(ctx, setup, teacher, torch.from_numpy(setup.labeled.labels), offline, len(setup.labeled),
                         mutual_weight)
    return KDSetup(sources, dataset, shards, loss_fn, teacher_dir, teacher_meta, ensemble_dirs, num_unlabeled,
                   problems, math.ceil(num_unlabeled / cfg.train.batch_size))


def teacher_comparison(setup: TrainingSetup, kd: KDSetup, logits: np.ndarray, temperature: float) -> dict:
    """The teacher's own test top-1 and how often the student agrees with it; with an ensemble, the same
    for the ensemble as taught (`ensemble_top1`, `ensemble_agreement`) and each other member's top-1."""
    def top1(found: np.ndarray) -> float:
        return float((found.argmax(1) == setup.test.labels).mean())

    def agreement(found: np.ndarray) -> float:
        return float((logits.argmax(1) == found.argmax(1)).mean())

    teacher_logits = setup.checkpoint_test_logits(kd.teacher_dir)
    found = {**kd.teacher_lineage(), "teacher_arch": kd.teacher_meta.arch,
             "teacher_top1": top1(teacher_logits), "teacher_agreement": agreement(teacher_logits)}
    if kd.ensemble_dirs:
        members = [setup.checkpoint_test_logits(directory) for directory in kd.ensemble_dirs]
        taught = mean_softened(torch.from_numpy(np.stack([teacher_logits, *members])), temperature).numpy()
        found.update(ensemble_member_top1=[top1(m) for m in members], ensemble_top1=top1(taught),
                     ensemble_agreement=agreement(taught))
    return found


def build_peer(ctx: StageContext, this: Stage, setup: TrainingSetup) -> torch.nn.Module:
    """The mutual-learning peer, built after the student so its random init differs."""
    spec = peer_config(ctx.config, this.spec)
    peer, init = build_model(student_stage_config(ctx.config, spec), setup.data, resolve_init(spec.init, None, ctx.run))
    setup.accelerator.print(f"[{this.name}] mutual learning with a {spec.arch} peer (weight "
                            f"{ctx.config.distill.mutual.weight}, init {init.source.text or 'random'})")
    return peer.to(memory_format=torch.channels_last) if setup.channels_last else peer


def finish_peer(ctx: StageContext, this: Stage, setup: TrainingSetup, peer: torch.nn.Module,
                student_logits: np.ndarray) -> dict:
    """The peer's test top-1 and agreement with the student; its checkpoint in RUN/<stage>/peer/."""
    spec = peer_config(ctx.config, this.spec)
    logits = predict_logits(setup.accelerator, peer, setup.test.images, setup.eval_transform,
                            torch.tensor(setup.mean), torch.tensor(setup.std), setup.stage.train.eval_batch_size,
                            setup.workers, setup.channels_last, desc=f"{this.name} eval test (peer)",
                            progress=ctx.config.runtime.progress)
    directory = ctx.run.stage_dir(this.name) / "peer"
    if setup.accelerator.is_main_process:
        meta = CheckpointMeta(arch=spec.arch, num_classes=setup.data.num_classes, in_chans=setup.data.in_chans,
                              input_size=spec.input_size, mean=setup.mean, std=setup.std,
                              class_names=tuple(setup.data.classes), config_hash=fingerprint(setup.fingerprint_inputs),
                              lineage={"stage": this.name, "role": "mutual-learning peer"})
        save_checkpoint(directory, peer, meta)
    setup.accelerator.wait_for_everyone()
    return {"weight": ctx.config.distill.mutual.weight, "peer_arch": spec.arch, "peer_checkpoint": str(directory),
            "peer_top1": float((logits.argmax(1) == setup.test.labels).mean()),
            "peer_agreement": float((logits.argmax(1) == student_logits.argmax(1)).mean())}


def run(ctx: StageContext, this: Stage) -> dict:
    config, run_dir, data, name = ctx.config, ctx.run, ctx.data(), this.name
    cfg, spec = config.distill, this.spec
    extra = teacher_inputs(ctx, this)
    setup = setup_training(config, run_dir, data, student_stage_config(config, spec), name, extra)
    kd = prepare_kd(ctx, this, setup, cfg.mutual.weight)
    peer = build_peer(ctx, this, setup) if cfg.mutual.weight > 0 else None
    total_steps = cfg.train.total_steps(kd.steps_per_epoch)
    setup.accelerator.print(
        f"[{name}] {spec.arch} at {spec.input_size} px from {kd.teacher_meta.arch} ({kd.teacher_dir})"
        f"{f' with {len(cfg.ensemble)} more ensemble member(s)' if cfg.ensemble else ''}, "
        f"{cfg.mode} teaching, T={cfg.temperature}, {cfg.alpha} CE + {cfg.beta} KD"
        f"{' (hard)' if cfg.hard else ''}"
        f"{f', mixup {cfg.mixup} (mixed rows: KD only, the CE term is off)' if cfg.mixup else ''}; "
        f"{cfg.labeled_batch} labeled + {cfg.train.batch_size} unlabeled a step ({cfg.pool} pool of "
        f"{kd.num_unlabeled}), {total_steps} steps, "
        f"policy {setup.policy!r}")
    trained = setup.model if peer is None else MutualPair(setup.model, peer)
    batches, stream_state = kd.batches(ctx, setup, total_steps)
    result = train(setup.accelerator, trained, cfg.train, total_steps, kd.steps_per_epoch, batches, kd.loss_fn,
                   state_dir=run_dir.state_dir(name), name=name, progress=config.runtime.progress,
                   extra_state=stream_state)
    ema = swap_in_ema(setup, result, trained)
    logits = setup.test_logits()
    metrics = {**extra, **ema, "mode": cfg.mode, "input_size": spec.input_size,
               **teacher_comparison(setup, kd, logits, cfg.temperature),
               "num_unlabeled": kd.num_unlabeled, "unlabeled_problems": {**kd.problems, **kd.streamed_problems()},
               "steps_per_epoch": kd.steps_per_epoch, "pool": cfg.pool}
    if peer is not None:
        metrics["mutual"] = finish_peer(ctx, this, setup, peer, logits)
    lineage = {**kd.teacher_lineage(), **extra}
    return finish(setup, result, lineage, metrics, logits=logits)
