"""The selected unlabeled pool for a student: images joined with sidecar labels by `__key__`.

Reads the unlabeled shards, the pseudo-label sidecars and the selection plans;
keeps rows with a repeat count > 0. Every path comes from the run directory. Never reads the pool's hidden true labels.
Decoded images are held in memory (fine for pools of a few million small
images; larger pools need a streaming mixture, not built yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.bars import progress_bar
from pipeline.core.rundir import RunDir
from pipeline.data.imageset import DataInfo
from pipeline.data.shards import ShardError, decode_image, iter_shard
from teachers.sidecar import Sidecar, hard_labels, read_sidecar, soft_labels


class PoolError(RuntimeError):
    """Sidecars, plans and shards do not line up."""


@dataclass(frozen=True)
class LabelForm:
    """How sidecar logits become training targets (recorded by the select stage)."""

    labels: str  # "soft" (softmax at `temperature`), "hard" (argmax with `smoothing`), "logits" (as stored)
    temperature: float
    smoothing: float

    def targets(self, sidecar: Sidecar) -> np.ndarray:
        """(N, C) float32 training targets of a sidecar's rows."""
        if self.labels == "logits":
            found = sidecar.full_logits()
        elif self.labels == "soft":
            found = soft_labels(sidecar, self.temperature)
        else:
            found = hard_labels(sidecar, self.smoothing)
        return found.astype(np.float32)

    @classmethod
    def from_select_metrics(cls, metrics: dict) -> "LabelForm":
        return cls(metrics["labels"], metrics["label_temperature"], metrics["label_smoothing"])


@dataclass
class SelectedPool:
    images: list[np.ndarray]
    targets: np.ndarray  # (U, C) float32 label distributions, one per unique kept image
    repeats: np.ndarray  # (U,) copies of each image in one unlabeled epoch
    keys: list[str]

    def population(self) -> np.ndarray:
        """Stream positions of one epoch: image i appears repeats[i] times."""
        return np.repeat(np.arange(len(self.images)), self.repeats)


def load_selected_pool(data: DataInfo, run: RunDir, labels_stage: str, select_stage: str, form: LabelForm,
                       progress: bool = True) -> SelectedPool:
    images: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    repeats: list[np.ndarray] = []
    keys: list[str] = []
    for record in progress_bar(data.shard_records("unlabeled"), desc="load pool", unit="shard",
                               disable=not progress, leave=False):
        sidecar = read_sidecar(run.sidecar_path(labels_stage, record["name"]))
        plan_path = run.plan_path(select_stage, record["name"])
        plan = np.load(plan_path)
        if list(plan["keys"]) != list(sidecar.keys):
            raise PoolError(f"{plan_path} does not match its sidecar's keys; rerun --from {select_stage}")
        keep = plan["repeats"] > 0
        wanted = {str(k): i for i, k in enumerate(sidecar.keys) if keep[i]}
        dist = form.targets(sidecar)
        shard = data.shard_path("unlabeled", record["name"])
        found: dict[int, np.ndarray] = {}
        for sample in iter_shard(shard, on_error="skip"):
            row = wanted.get(str(sample["__key__"]))
            if row is None or row in found:  # a second sample under a labeled key: the first was labeled
                continue
            try:
                found[row] = decode_image(sample, shard, data.mode, data.image_keys)
            except ShardError:
                continue  # was skipped at labeling time too
        missing = set(wanted.values()) - set(found)
        if missing:
            raise PoolError(f"{shard}: {len(missing)} selected keys are no longer readable "
                            f"(e.g. '{sidecar.keys[min(missing)]}'); the shard changed after labeling")
        if not found:  # nothing kept here (a shard with no readable image: its sidecar may be 0 x 1 in old runs)
            continue
        for row in sorted(found):
            images.append(found[row])
            keys.append(str(sidecar.keys[row]))
        rows = np.array(sorted(found), dtype=np.int64)
        targets.append(dist[rows])
        repeats.append(plan["repeats"][rows])
    if not images:
        raise PoolError(f"selection in {run.stage_dir(select_stage)} kept no unlabeled images; "
                        "lower select.min_confidence")
    return SelectedPool(images, np.concatenate(targets).astype(np.float32), np.concatenate(repeats), keys)
