"""Decoded splits held in memory (labeled, holdout and test sets are small).

Labeled data is read strictly: a sample that does not decode, lacks `cls`, or
a truncated shard raises `ShardError` naming the shard and key. Shard hashes
are checked against the manifest so a changed or damaged file is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.atomic import read_json, sha256_file
from pipeline.data.importer import MANIFEST
from pipeline.data.shards import ReadProblems, ShardError, decode_image, decode_label, iter_shard


class DataDirError(RuntimeError):
    """The imported data directory is missing or inconsistent."""


@dataclass(frozen=True)
class DataInfo:
    root: Path
    manifest: dict

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def mode(self) -> str:
        return str(self.manifest["mode"])

    @property
    def in_chans(self) -> int:
        return 1 if self.mode == "L" else 3

    def shard_records(self, split: str) -> list[dict]:
        """One record per shard of `split`: name, count, sha256."""
        return list(self.manifest["splits"].get(split, {}).get("shards", []))

    def shard_path(self, split: str, shard_name: str) -> Path:
        return self.root / split / shard_name

    def shard_paths(self, split: str) -> list[Path]:
        return [self.shard_path(split, rec["name"]) for rec in self.shard_records(split)]

    @property
    def truth_path(self) -> Path:
        """Hidden true labels of the unlabeled pool (reporting only); may not exist."""
        return self.root / self.manifest.get("unlabeled_truth", {}).get("file", "unlabeled_truth.json")

    def count(self, split: str) -> int:
        return int(self.manifest["splits"].get(split, {}).get("count", 0))


def open_data(root: str | Path) -> DataInfo:
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise DataDirError(f"{root}: no {MANIFEST}; import data first (`selftrain data fashion-mnist --out {root}`)")
    return DataInfo(root, read_json(path))


@dataclass
class ImageSet:
    """Images (list of uint8 HxWxC arrays; any sizes), labels and keys of one split."""

    images: list[np.ndarray]
    labels: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.images)


def verify_shard(info: DataInfo, split: str, path: Path) -> None:
    record = next(r for r in info.manifest["splits"][split]["shards"] if r["name"] == path.name)
    if not path.exists():
        raise ShardError(f"shard {path} listed in {info.root / MANIFEST} is missing")
    if sha256_file(path) != record["sha256"]:
        raise ShardError(f"shard {path} does not match the sha256 in {info.root / MANIFEST} (changed or corrupt)")


def load_labeled_split(info: DataInfo, split: str) -> ImageSet:
    """Decode a labeled split (labeled/holdout/test) strictly into memory."""
    images, labels, keys = [], [], []
    for path in info.shard_paths(split):
        verify_shard(info, split, path)
        for sample in iter_shard(path, on_error="raise"):
            images.append(decode_image(sample, path, info.mode))
            labels.append(decode_label(sample, path, info.num_classes))
            keys.append(str(sample["__key__"]))
    expected = info.count(split)
    if len(images) != expected:
        raise ShardError(f"split '{split}' in {info.root}: read {len(images)} samples, manifest says {expected}")
    return ImageSet(images, np.asarray(labels, dtype=np.int64), keys)


def load_unlabeled_split(info: DataInfo) -> tuple[ImageSet, ReadProblems]:
    """Decode the unlabeled pool into memory, skip-and-count: a bad sample or a truncated shard is
    recorded in the returned problems, never fatal. Labels are -1 (the pool's are never read)."""
    images, keys = [], []
    problems = ReadProblems()
    for path in info.shard_paths("unlabeled"):
        for sample in iter_shard(path, on_error="skip", problems=problems):
            try:
                images.append(decode_image(sample, path, info.mode))
            except ShardError as exc:
                problems.skipped.append({"shard": path.name, "key": str(sample["__key__"]), "reason": str(exc)})
                continue
            keys.append(str(sample["__key__"]))
    return ImageSet(images, np.full(len(images), -1, dtype=np.int64), keys), problems


def channel_stats(images: list[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units (stored with the checkpoint)."""
    flat = np.concatenate([im.reshape(-1, im.shape[-1]) for im in images]).astype(np.float64) / 255.0
    return tuple(float(x) for x in flat.mean(0)), tuple(float(max(x, 1e-3)) for x in flat.std(0))
