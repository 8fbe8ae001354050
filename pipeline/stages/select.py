"""Stage `select_r{i}`: calibration (optional), confidence threshold and class balancing.

Reads: pseudo_label sidecars, the teacher checkpoint (for calibration on the
holdout split and ECE on the test split).
Writes: one plan per sidecar (`<shard>.plan.npz`: keys + repeat counts, 0 =
dropped), `metrics.json` (class counts before/after, calibration, accuracy of
the selected labels when the pool's hidden labels exist), `class_counts.png`,
`DONE`. Streams shard by shard: only confidences of one shard at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_open, read_json
from pipeline.config.sections import Config
from pipeline.data.imageset import DataInfo, load_labeled_split
from pipeline.core.plots import class_count_chart
from pipeline.engine.predict import checkpoint_logits
from pipeline.config.schema import to_dict
from pipeline.core.rundir import RunDir, RunDirError
from pipeline.engine.runtime import loader_workers, make_accelerator, use_channels_last
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.pseudo_label import verify_sidecars
from teachers.checkpoint import checkpoint_hash
from teachers.calibration import accuracy_above, calibration_report, fit_temperature
from teachers.selection import plan_selection
from teachers.sidecar import confidence_and_prediction, read_sidecar


def _teacher_logits(config: Config, run: RunDir, data: DataInfo, teacher_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    accelerator = make_accelerator(config.runtime, run.logs_dir(), "select", {})
    images = load_labeled_split(data, split)
    logits = checkpoint_logits(accelerator, teacher_dir, data.num_classes, images.images, config.pseudo_label.batch_size,
                               loader_workers(config.runtime), use_channels_last(config.runtime),
                               desc=f"teacher on {split}", progress=config.runtime.progress)
    return logits, images.labels


def calibrate(config: Config, run: RunDir, data: DataInfo, teacher_dir: Path) -> dict:
    """Temperature from the holdout split; ECE on the test split before and after."""
    if not config.select.calibrate:
        return {"temperature": 1.0, "calibrated": False}
    if data.count("holdout") == 0:
        raise RunDirError("select.calibrate is true but the data has no holdout split; "
                          "set data.holdout_per_class > 0 (taken from the labeled budget)")
    hold_logits, hold_labels = _teacher_logits(config, run, data, teacher_dir, "holdout")
    temperature = fit_temperature(hold_logits, hold_labels)
    test_logits, test_labels = _teacher_logits(config, run, data, teacher_dir, "test")
    return {"temperature": temperature, "calibrated": True, "fitted_on": f"holdout ({len(hold_labels)} images)",
            "test": calibration_report(test_logits, test_labels, temperature)}


class DuplicateKeys:
    """Keys met again in a later unlabeled shard: hidden labels and sidecars are joined by key, so a
    second image under one key is never selected (skipped and counted, with examples named)."""

    MAX_EXAMPLES = 5

    def __init__(self) -> None:
        self.first_shard: dict[str, str] = {}
        self.count = 0
        self.examples: list[str] = []

    def mark(self, keys: np.ndarray, shard: str) -> np.ndarray:
        """Boolean mask of the keys of `shard` already seen in an earlier shard."""
        mask = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(map(str, keys)):
            first = self.first_shard.setdefault(key, shard)
            if first != shard:
                mask[i] = True
                self.count += 1
                if len(self.examples) < self.MAX_EXAMPLES:
                    self.examples.append(f"'{key}' in {shard}, first in {first}")
        return mask

    def report(self) -> dict:
        return {"count": self.count, "examples": self.examples}


def inputs(ctx: StageContext, stage: Stage) -> dict:
    return {"teacher_sha256": checkpoint_hash(ctx.teacher_dir(stage)), "select": to_dict(ctx.config.select),
            "holdout_shards": [r["sha256"] for r in ctx.data().shard_records("holdout")]}


def run(ctx: StageContext, stage: Stage) -> dict:
    config, run, data, name = ctx.config, ctx.run, ctx.data(), stage.name
    cfg = config.select
    out_dir = run.stage_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    verify_sidecars(run, data, stage.labels, checkpoint_hash(ctx.teacher_dir(stage)))
    calibration = calibrate(config, run, data, ctx.teacher_dir(stage))  # every process: the forward is split
    if not ctx.state.is_main_process:
        return {}
    temperature = calibration["temperature"]
    records = data.shard_records("unlabeled")
    sidecars = [run.sidecar_path(stage.labels, r["name"]) for r in records]
    pool = sum(int(r["count"]) for r in records)
    per_class = cfg.per_class or max(1, pool // data.num_classes)

    duplicates = DuplicateKeys()

    def stats():
        for record, path in zip(records, sidecars):
            sidecar = read_sidecar(path)
            conf, pred = confidence_and_prediction(sidecar, temperature)
            yield path.name, np.where(duplicates.mark(sidecar.keys, record["name"]), -1.0, conf), pred

    plan = plan_selection(stats(), data.num_classes, cfg.min_confidence, per_class, cfg.seed)
    truth = read_json(data.truth_path) if data.truth_path.exists() else None
    kept_conf, kept_right, kept_weight = [], [], []
    for record, path in zip(records, sidecars):
        sidecar = read_sidecar(path)
        repeats = plan.repeats[path.name]
        with atomic_open(run.plan_path(name, record["name"])) as handle:
            np.savez(handle, keys=sidecar.keys, repeats=repeats)
        if truth is not None:
            conf, pred = confidence_and_prediction(sidecar, temperature)
            labels = np.array([truth.get(str(k), -1) for k in sidecar.keys])
            mask = (repeats > 0) & (labels >= 0)  # out-of-domain images have no true target label
            kept_conf.append(conf[mask])
            kept_right.append((pred == labels)[mask])
            kept_weight.append(repeats[mask])
    summary = plan.summary()
    for row in summary["per_class_table"]:
        row["name"] = data.classes[row["class"]]
    metrics = {"labels": cfg.labels, "label_temperature": temperature * cfg.temperature,
               "label_smoothing": cfg.label_smoothing if cfg.labels == "hard" else 0.0,
               "calibration": calibration, "selection": summary, "duplicate_keys": duplicates.report()}
    if duplicates.count:
        print(f"[{name}] warning: {duplicates.count} unlabeled keys already seen in an earlier shard were dropped "
              f"(e.g. {duplicates.examples[0]}); see duplicate_keys in {run.metrics_path(name)}")
    if truth is not None and kept_conf:
        right = np.concatenate(kept_right).astype(np.float64)
        weight = np.concatenate(kept_weight).astype(np.float64)
        metrics["selected_accuracy"] = {
            "unique": float(right.mean()) if len(right) else None,
            "weighted_by_copies": float((right * weight).sum() / weight.sum()) if weight.sum() else None,
            "accuracy_above": accuracy_above(np.concatenate(kept_conf), right),
            "note": "hidden true labels of the pool; reporting only"}
    class_count_chart(summary["per_class_table"], out_dir / "class_counts.png",
                      title=f"selection: conf >= {cfg.min_confidence}, {per_class} per class")
    run.write_metrics(name, metrics)
    run.mark_done(name)
    kept = summary["unique_kept"]
    print(f"[{name}] kept {kept} unique images ({summary['copies']} with copies) of {summary['total']}; "
          f"{cfg.labels} labels at temperature {metrics['label_temperature']:.3f} (calibration {temperature:.3f}) "
          f"-> {out_dir / 'metrics.json'}")
    return metrics
