"""Stage `pseudo_label`: the un-noised teacher labels every unlabeled shard.

Reads: a teacher checkpoint, data/unlabeled/*.tar (+ manifest).
Writes: one sidecar per input shard (`<shard>.labels.npz`, fp16 logits keyed by
`__key__`, atomic), then `manifest.json` (counts, skipped samples, throughput)
and `metrics.json` last. A finished sidecar is skipped on rerun, so a kill
loses at most the shards in flight. Under several processes, rank r labels
shards r, r+W, ...; rank 0 writes the manifest after every rank is done.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tqdm import tqdm

from augment import build_eval_transform
from pipeline.atomic import read_json, write_json
from pipeline.config import Config
from pipeline.faults import kill_point
from pipeline.imageset import DataInfo
from pipeline.loader import to_model_input
from pipeline.metrics import expected_calibration_error
from pipeline.rundir import RunDir, RunDirError
from pipeline.runtime import configure_threads, loader_workers, mixed_precision, process_state, use_channels_last
from pipeline.shard_stream import ShardBatch, stream_loader
from teachers.calibration import accuracy_above, accuracy_by_confidence
from teachers.checkpoint import checkpoint_hash, load_checkpoint
from teachers.sidecar import confidence_and_prediction, read_sidecar, read_sidecar_meta, write_sidecar

MANIFEST = "manifest.json"


def sidecar_path(out_dir: Path, shard: Path) -> Path:
    return out_dir / (shard.name.removesuffix(".tar") + ".labels.npz")


def shard_records(data: DataInfo) -> list[dict]:
    return list(data.manifest["splits"]["unlabeled"]["shards"])


def _expected_meta(teacher_hash: str, record: dict) -> dict:
    return {"teacher_sha256": teacher_hash, "source_shard": record["name"], "source_sha256": record["sha256"]}


def pending_shards(out_dir: Path, data: DataInfo, teacher_hash: str, stage: str) -> list[dict]:
    """Shards without a finished sidecar; a sidecar made from another teacher or shard is refused."""
    pending = []
    for record in shard_records(data):
        path = sidecar_path(out_dir, data.root / "unlabeled" / record["name"])
        if not path.exists():
            pending.append(record)
            continue
        meta = read_sidecar_meta(path)
        expected = _expected_meta(teacher_hash, record)
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            names = {"teacher_sha256": "teacher checkpoint", "source_sha256": "unlabeled shard"}
            what = ", ".join(f"{names.get(k, k)} {a!s:.12} -> {b!s:.12}" for k, (a, b) in wrong.items())
            raise RunDirError(f"{path} was made from a different {what}; rerun with --from {stage} "
                              "(or a new --run-dir) instead of mixing labels")
    return pending


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """The configured mixed precision on a GPU; a no-op on CPU."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")


def label_shards(model: torch.nn.Module, shards: list[Path], records: list[dict], out_dir: Path,
                 transform, mode: str, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                 batch_size: int, workers: int, channels_last: bool, precision: str, teacher_hash: str,
                 topk: int | None, progress: bool, total_images: int) -> int:
    """Label `shards`, writing each sidecar as soon as its last batch is done; returns images labeled."""
    buffers: dict[int, tuple[list[str], list[np.ndarray]]] = {}
    labeled = batches = 0
    bar = tqdm(total=total_images, desc="pseudo-label", unit="img", disable=not progress, dynamic_ncols=True)
    shard_bar_done = 0
    mean, std = mean.to(device), std.to(device)
    with torch.inference_mode():
        for item in stream_loader(shards, transform, batch_size, mode, workers):
            if isinstance(item, ShardBatch):
                x = to_model_input(item.images, mean, std, device, channels_last)
                with _autocast(device, precision):
                    logits = model(x).float().cpu().numpy()
                keys, chunks = buffers.setdefault(item.shard, ([], []))
                keys.extend(item.keys)
                chunks.append(logits)
                bar.update(len(item.keys))
                batches += 1
                kill_point("batch", batches)
                continue
            keys, chunks = buffers.pop(item.shard, ([], []))
            logits = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
            meta = {**_expected_meta(teacher_hash, records[item.shard]), "count": item.count,
                    "problems": item.problems}
            write_sidecar(sidecar_path(out_dir, shards[item.shard]), keys, logits, meta, topk)
            labeled += item.count
            shard_bar_done += 1
            bar.set_postfix(shards=f"{shard_bar_done}/{len(shards)}")
    bar.close()
    return labeled


def pool_report(out_dir: Path, data: DataInfo) -> dict:
    """Pseudo-label accuracy against the pool's hidden labels (when the import kept them)."""
    truth_path = data.root / data.manifest.get("unlabeled_truth", {}).get("file", "unlabeled_truth.json")
    if not truth_path.exists():
        return {}
    truth = read_json(truth_path)
    confs, correct = [], []
    for record in shard_records(data):
        sidecar = read_sidecar(sidecar_path(out_dir, data.root / "unlabeled" / record["name"]))
        conf, pred = confidence_and_prediction(sidecar)
        labels = np.array([truth.get(str(k), -1) for k in sidecar.keys])
        confs.append(conf)
        correct.append(pred == labels)
    conf, right = np.concatenate(confs), np.concatenate(correct).astype(np.float64)
    return {"pool_accuracy": float(right.mean()), "pool_ece": expected_calibration_error(conf, right),
            "accuracy_above": accuracy_above(conf, right), "accuracy_by_confidence": accuracy_by_confidence(conf, right),
            "note": "measured with the pool's hidden true labels; never used for training or selection"}


def run_pseudo_label(config: Config, run: RunDir, data: DataInfo, teacher_dir: Path,
                     name: str = "pseudo_label_r1") -> dict:
    state = process_state()
    cfg = config.pseudo_label
    configure_threads(config.runtime)
    out_dir = run.stage_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_hash = checkpoint_hash(teacher_dir)
    model, meta = load_checkpoint(teacher_dir, num_classes=data.num_classes)
    channels_last = use_channels_last(config.runtime)
    model = model.to(state.device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    topk = cfg.topk if data.num_classes > cfg.topk_above_classes else None
    started = time.perf_counter()
    pending = pending_shards(out_dir, data, teacher_hash, name)
    mine = pending[state.process_index::state.num_processes]
    shards = [data.root / "unlabeled" / r["name"] for r in mine]
    total = sum(int(r["count"]) for r in mine)
    state.print(f"[{name}] {len(pending)} of {len(shard_records(data))} shards to label "
                f"({state.num_processes} process(es)), teacher {meta.arch} {teacher_hash[:12]}")
    labeled = label_shards(model, shards, mine, out_dir, build_eval_transform(meta.input_size), data.mode,
                           torch.tensor(meta.mean), torch.tensor(meta.std), state.device, cfg.batch_size,
                           loader_workers(config.runtime), channels_last, mixed_precision(config.runtime),
                           teacher_hash, topk, config.runtime.progress and state.is_local_main_process, total)
    seconds = time.perf_counter() - started
    state.wait_for_everyone()
    metrics: dict = {}
    if state.is_main_process:
        metrics = write_manifest(out_dir, data, teacher_dir, teacher_hash, topk, labeled, seconds,
                                 len(pending), state.num_processes)
        run.mark_done(name)
        state.print(f"[{name}] {metrics['num_labeled']} images labeled, {metrics['num_skipped']} skipped"
                    + (f"; pool accuracy {metrics['pool_accuracy']:.4f}" if "pool_accuracy" in metrics else ""))
    state.wait_for_everyone()
    return metrics


def write_manifest(out_dir: Path, data: DataInfo, teacher_dir: Path, teacher_hash: str, topk: int | None,
                   labeled_now: int, seconds: float, shards_now: int, processes: int) -> dict:
    sidecars, skipped, truncated, total = [], [], [], 0
    for record in shard_records(data):
        path = sidecar_path(out_dir, data.root / "unlabeled" / record["name"])
        meta = read_sidecar_meta(path)
        total += int(meta["count"])
        skipped += meta["problems"]["skipped"]
        truncated += meta["problems"]["truncated"]
        sidecars.append({"name": path.name, "source_shard": record["name"], "count": meta["count"]})
    metrics = {"num_labeled": total, "num_skipped": len(skipped), "num_truncated_shards": len(truncated),
               "images_per_s_this_run": round(labeled_now / max(seconds, 1e-9), 1),
               "shards_this_run": shards_now, "processes": processes, **pool_report(out_dir, data)}
    manifest = {"format": "selftrain-labels/1", "teacher": str(teacher_dir), "teacher_sha256": teacher_hash,
                "layout": "topk" if topk else "full", "topk": topk, "sidecars": sidecars,
                "skipped": skipped, "truncated": truncated, **{k: metrics[k] for k in
                ("num_labeled", "num_skipped", "num_truncated_shards", "images_per_s_this_run")}}
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / MANIFEST, manifest)
    return metrics

