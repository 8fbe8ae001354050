"""Stage `pseudo_label_r{i}`: the un-noised teacher labels every unlabeled shard.

Reads: the round's teacher checkpoint, the unlabeled shards the data manifest names
(data/unlabeled/*.tar, or their URLs when used in place).
Writes: one sidecar per input shard (`<shard>.labels.npz`, fp16 logits keyed by
`__key__`, atomic), then `metrics.json` and `manifest.json` last. A finished
sidecar is skipped on rerun, so a kill loses at most the shards in flight. Under
several processes, rank r labels shards r, r+W, ...; rank 0 writes the manifest
after every rank is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate.utils import gather_object

from augment import build_eval_transform
from pipeline.config.schema import to_dict
from pipeline.core.atomic import read_json, write_json
from pipeline.core.bars import progress_bar
from pipeline.core.faults import kill_point
from pipeline.core.progress import PROGRESS_FILE, ProgressWriter
from pipeline.core.metrics import expected_calibration_error
from pipeline.core.rundir import RunDir, RunDirError
from pipeline.data.imageset import DataInfo
from pipeline.data.loader import Transform, to_model_input
from pipeline.data.shard_io import ShardLocation
from pipeline.data.shards import IMAGE_KEYS
from pipeline.data.shard_stream import ShardBatch, stream_loader
from pipeline.engine.ranks import on_every_rank
from pipeline.engine.runtime import configure_threads, loader_workers, mixed_precision, use_channels_last
from pipeline.stages.base import Stage, StageContext
from teachers.calibration import accuracy_above, accuracy_by_confidence
from pipeline.engine.predict import load_model
from teachers.checkpoint import checkpoint_hash
from teachers.sidecar import SidecarError, confidence_and_prediction, read_sidecar, read_sidecar_meta, write_sidecar


def _expected_meta(teacher_hash: str, record: dict) -> dict:
    return {"teacher_sha256": teacher_hash, "source_shard": record["name"], "source_sha256": record["sha256"]}


def pending_shards(run: RunDir, data: DataInfo, teacher_hash: str, stage: str) -> list[dict]:
    """Shards without a finished sidecar; a sidecar made from another teacher or shard is refused."""
    pending = []
    for record in data.shard_records("unlabeled"):
        path = run.sidecar_path(stage, record["name"])
        if not path.exists():
            pending.append(record)
            continue
        try:
            meta = read_sidecar_meta(path)
        except SidecarError as error:  # written whole or not at all: damaged on disk since
            raise SidecarError(f"{error}; delete it and rerun to label shard {record['name']} again") from None
        expected = _expected_meta(teacher_hash, record)
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            names = {"teacher_sha256": "teacher checkpoint", "source_sha256": "unlabeled shard"}
            what = ", ".join(f"{names.get(k, k)} {a!s:.12} -> {b!s:.12}" for k, (a, b) in wrong.items())
            raise RunDirError(f"{path} was made from a different {what}; rerun with --from {stage} "
                              "(or a new --run-dir) instead of mixing labels")
    return pending


def verify_sidecars(run: RunDir, data: DataInfo, labels_stage: str, teacher_hash: str) -> None:
    """Every sidecar was made by `teacher_hash` from the shard the data manifest names, as the
    pseudo-label manifest says: a sidecar swapped in from another teacher or shard is refused."""
    manifest_path = run.manifest_path(labels_stage)
    manifest = read_json(manifest_path)
    if manifest.get("teacher_sha256") != teacher_hash:
        raise SidecarError(f"{manifest_path}: labels made by teacher {str(manifest.get('teacher_sha256'))[:12]}, "
                           f"but this stage's teacher is {teacher_hash[:12]}; rerun with --from {labels_stage}")
    for record in data.shard_records("unlabeled"):
        path = run.sidecar_path(labels_stage, record["name"])
        meta = read_sidecar_meta(path)
        wrong = {k: (meta.get(k), v) for k, v in _expected_meta(teacher_hash, record).items() if meta.get(k) != v}
        if wrong:
            what = ", ".join(f"{k} {str(a)[:12]} (expected {str(b)[:12]})" for k, (a, b) in wrong.items())
            raise SidecarError(f"{path}: not the sidecar {manifest_path} lists ({what}); "
                               f"rerun with --from {labels_stage}")


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """The configured mixed precision on a GPU; a no-op on CPU."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")


@dataclass(frozen=True)
class Labeler:
    """The un-noised teacher as it labels: model, its own preprocessing, and where it runs."""

    model: torch.nn.Module
    transform: Transform
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    channels_last: bool
    precision: str  # "no", "bf16" or "fp16" (autocast on GPU only)
    teacher_hash: str


@dataclass(frozen=True)
class LabelingJob:
    """Which shards to label, into which sidecars, and how to read them."""

    shards: list[ShardLocation]  # local files, or URLs for shards used in place
    records: list[dict]  # the manifest record of each shard (name, count, sha256)
    sidecars: list[Path]
    mode: str  # image mode of the data ("L" or "RGB")
    num_classes: int  # the logits' width, also of a shard that gave no image
    batch_size: int
    workers: int
    topk: int | None  # sidecars keep only the top-k logits (many classes)
    progress: bool
    image_keys: tuple[str, ...] = IMAGE_KEYS  # members that hold the image, tried in order
    status: Callable[[], None] | None = None  # called after each sidecar (updates RUN/<stage>/progress.json)

    @property
    def total_images(self) -> int:
        return sum(int(r["count"]) for r in self.records)


def label_shards(labeler: Labeler, job: LabelingJob) -> int:
    """Label `job.shards`, writing each sidecar as soon as its last batch is done; returns images labeled."""
    buffers: dict[int, tuple[list[str], list[np.ndarray]]] = {}
    labeled = batches = shards_done = 0
    bar = progress_bar(total=job.total_images, desc="pseudo-label", unit="img", disable=not job.progress,
                       dynamic_ncols=True)
    mean, std = labeler.mean.to(labeler.device), labeler.std.to(labeler.device)
    with torch.inference_mode():
        for item in stream_loader(job.shards, labeler.transform, job.batch_size, job.mode, job.workers,
                                  job.image_keys):
            if isinstance(item, ShardBatch):
                x = to_model_input(item.images, mean, std, labeler.device, labeler.channels_last)
                with _autocast(labeler.device, labeler.precision):
                    logits = labeler.model(x).float().cpu().numpy()
                keys, chunks = buffers.setdefault(item.shard, ([], []))
                keys.extend(item.keys)
                chunks.append(logits)
                bar.update(len(item.keys))
                batches += 1
                kill_point("batch", batches)
                continue
            keys, chunks = buffers.pop(item.shard, ([], []))
            logits = np.concatenate(chunks) if chunks else np.zeros((0, job.num_classes), np.float32)
            meta = {**_expected_meta(labeler.teacher_hash, job.records[item.shard]), "count": item.count,
                    "problems": item.problems}
            write_sidecar(job.sidecars[item.shard], keys, logits, meta, job.topk)
            labeled += item.count
            shards_done += 1
            if job.status is not None:
                job.status()
            bar.set_postfix(shards=f"{shards_done}/{len(job.shards)}", refresh=False)
    bar.close()
    return labeled


def pool_report(run: RunDir, stage: str, data: DataInfo) -> dict:
    """Pseudo-label accuracy against the pool's hidden labels (when the import kept them)."""
    if not data.truth_path.exists():
        return {}
    truth = read_json(data.truth_path)
    confs, correct = [], []
    for record in data.shard_records("unlabeled"):
        sidecar = read_sidecar(run.sidecar_path(stage, record["name"]))
        conf, pred = confidence_and_prediction(sidecar)
        labels = np.array([truth.get(str(k), -1) for k in sidecar.keys])
        in_domain = labels >= 0  # out-of-domain images (another data set's classes) have no true label here
        confs.append(conf[in_domain])
        correct.append((pred == labels)[in_domain])
    conf, right = np.concatenate(confs), np.concatenate(correct).astype(np.float64)
    if not len(right):
        return {"note": "no unlabeled image has a hidden label of a target class"}
    return {"pool_accuracy": float(right.mean()), "pool_ece": expected_calibration_error(conf, right),
            "accuracy_above": accuracy_above(conf, right), "accuracy_by_confidence": accuracy_by_confidence(conf, right),
            "measured_images": len(right),
            "note": "measured with the pool's hidden true labels (target classes only); "
                    "never used for training or selection"}


def inputs(ctx: StageContext, stage: Stage) -> dict:
    settings = to_dict(ctx.config.pseudo_label)
    # the batch size changes no label (eval mode): a rerun may lower it (out of GPU memory) and keep the finished
    # sidecars. Records made when it was fingerprinted keep their value.
    recorded = ctx.recorded_inputs(stage).get("pseudo_label", {})
    if "batch_size" in recorded:
        settings["batch_size"] = recorded["batch_size"]
    else:
        del settings["batch_size"]
    return {"teacher_sha256": checkpoint_hash(ctx.teacher_dir(stage)), "pseudo_label": settings,
            "unlabeled_shards": [r["sha256"] for r in ctx.data().shard_records("unlabeled")]}


def run(ctx: StageContext, stage: Stage) -> dict:
    config, run_dir, state, data = ctx.config, ctx.run, ctx.state, ctx.data()
    cfg = config.pseudo_label
    configure_threads(config.runtime)
    run_dir.stage_dir(stage.name).mkdir(parents=True, exist_ok=True)
    teacher_dir = ctx.teacher_dir(stage)
    teacher_hash = checkpoint_hash(teacher_dir)
    model, meta = load_model(teacher_dir, data.num_classes)
    channels_last = use_channels_last(config.runtime)
    model = model.to(state.device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    labeler = Labeler(model, build_eval_transform(meta.input_size), torch.tensor(meta.mean), torch.tensor(meta.std),
                      state.device, channels_last, mixed_precision(config.runtime), teacher_hash)
    started = time.perf_counter()
    pending = pending_shards(run_dir, data, teacher_hash, stage.name)
    # every rank must split the same list: without this barrier a fast rank's first sidecar could
    # already exist when a slow rank lists the pending shards, and one shard would go unlabeled
    state.wait_for_everyone()
    mine = pending[state.process_index::state.num_processes]
    shards_total = len(data.shard_records("unlabeled"))
    status = None
    if state.is_main_process:  # every process's sidecars count: `selftrain status` shows the stage's progress
        writer = ProgressWriter(run_dir.stage_dir(stage.name) / PROGRESS_FILE, shards_total,
                                shards_total - len(pending), unit="shard")
        status = partial(_record_progress, writer, run_dir, stage.name)
        status()  # the count from the start, not only after the main process's first shard
    job = LabelingJob(shards=[data.shard_path("unlabeled", r["name"]) for r in mine], records=mine,
                      sidecars=[run_dir.sidecar_path(stage.name, r["name"]) for r in mine], mode=data.mode,
                      num_classes=data.num_classes,
                      image_keys=data.image_keys,
                      batch_size=cfg.batch_size, workers=loader_workers(config.runtime),
                      topk=cfg.topk if data.num_classes > max(cfg.topk_above_classes, cfg.topk) else None,
                      progress=config.runtime.progress and state.is_local_main_process, status=status)
    state.print(f"[{stage.name}] {len(pending)} of {shards_total} shards to label "
                f"({state.num_processes} process(es)), teacher {meta.arch} {teacher_hash[:12]}")
    # every process's images (all finish here); a shard one process cannot read stops them all, named
    labeled = sum(gather_object([on_every_rank(state, lambda: label_shards(labeler, job))]))
    seconds = time.perf_counter() - started
    metrics: dict = {}
    if state.is_main_process:
        metrics = write_manifest(ctx, stage, teacher_hash, job.topk, LabelingRun(labeled, seconds, len(pending), state.num_processes))
        run_dir.mark_done(stage.name)
        state.print(f"[{stage.name}] {metrics['num_labeled']} images labeled, {metrics['num_skipped']} skipped"
                    + (f", {metrics['num_unread']} not read from {metrics['num_truncated_shards']} truncated shard(s) "
                       "(listed in its manifest.json)" if metrics["num_truncated_shards"] else "")
                    + (f"; pool accuracy {metrics['pool_accuracy']:.4f}" if "pool_accuracy" in metrics else ""))
    state.wait_for_everyone()
    return metrics


def _record_progress(writer: ProgressWriter, run: RunDir, stage: str) -> None:
    writer.update(run.sidecars_done(stage), saved=True)


@dataclass(frozen=True)
class LabelingRun:
    """What this invocation did (a resumed stage labels only the pending shards)."""

    images: int
    seconds: float
    shards: int
    processes: int


def write_manifest(ctx: StageContext, stage: Stage, teacher_hash: str, topk: int | None,
                   this_run: LabelingRun) -> dict:
    run_dir, data = ctx.run, ctx.data()
    teacher_dir = ctx.teacher_dir(stage)
    sidecars, skipped, truncated, total, in_pool = [], [], [], 0, 0
    for record in data.shard_records("unlabeled"):
        in_pool += int(record["count"])
        path = run_dir.sidecar_path(stage.name, record["name"])
        meta = read_sidecar_meta(path)
        total += int(meta["count"])
        skipped += meta["problems"]["skipped"]
        truncated += meta["problems"]["truncated"]
        sidecars.append({"name": path.name, "source_shard": record["name"], "count": meta["count"]})
    metrics = {"num_labeled": total, "num_skipped": len(skipped), "num_truncated_shards": len(truncated),
               # a webdataset import's shard counts already leave its skipped samples out: never below 0
               "num_unread": max(0, in_pool - total - len(skipped)),
               "images_this_run": this_run.images,  # every process's
               "images_per_s_this_run": round(this_run.images / max(this_run.seconds, 1e-9), 1),
               "shards_this_run": this_run.shards, "processes": this_run.processes,
               **pool_report(run_dir, stage.name, data)}
    manifest = {"format": "selftrain-labels/1", "teacher": str(teacher_dir), "teacher_sha256": teacher_hash,
                "layout": "topk" if topk else "full", "topk": topk, "sidecars": sidecars,
                "skipped": skipped, "truncated": truncated, **{k: metrics[k] for k in
                ("num_labeled", "num_skipped", "num_truncated_shards", "images_per_s_this_run")}}
    run_dir.write_metrics(stage.name, metrics)
    write_json(run_dir.manifest_path(stage.name), manifest)
    return metrics
