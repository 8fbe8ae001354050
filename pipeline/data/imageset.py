"""Decoded splits held in memory (labeled, holdout and test sets are small).

Labeled data is read strictly: a sample that does not decode, lacks its label, or
a truncated shard raises `ShardError` naming the shard and key. Shard hashes
are checked against the manifest so a changed or damaged file is named: a local
file before it is read, a shard read from a URL (shards used in place,
`data.source: webdataset`) while it streams, at its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.core.atomic import read_json, sha256_file
from pipeline.data.importer import MANIFEST
from pipeline.data.shard_io import Fingerprint, ShardLocation, as_location, shard_basename
from pipeline.data.shards import IMAGE_KEYS, ReadProblems, ShardError, decode_image, decode_label, iter_shard


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

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Members that hold a sample's image, tried in order."""
        return tuple(self.manifest.get("image_keys", IMAGE_KEYS))

    @property
    def label_key(self) -> str:
        """Where a labeled sample's class is: "cls" or "json:<field>"."""
        return str(self.manifest.get("label_key", "cls"))

    def shard_records(self, split: str) -> list[dict]:
        """One record per shard of `split`: name, count, sha256 (shards used in place: also url, size)."""
        return list(self.manifest["splits"].get(split, {}).get("shards", []))

    @cached_property
    def _urls(self) -> dict[tuple[str, str], str]:
        return {(split, r["name"]): r["url"] for split, entry in self.manifest["splits"].items()
                for r in entry.get("shards", []) if "url" in r}

    def shard_path(self, split: str, shard_name: str) -> ShardLocation:
        """Where a shard is read from: the URL (or local path) its record names when the shards are used
        in place, else `split/shard_name` under the data directory."""
        url = self._urls.get((split, shard_name))
        return as_location(url) if url is not None else self.root / split / shard_name

    def shard_paths(self, split: str) -> list[ShardLocation]:
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
        tars = root.is_dir() and any(root.glob("*.tar*"))
        raise DataDirError(f"{root}: no {MANIFEST}, so not an imported data directory; import into a new directory "
                           "first (`selftrain data fashion-mnist --out DIR` or `selftrain data folder SRC --out DIR`)"
                           + ("; shards another tool wrote are used in place with data.source: webdataset and their "
                              "URLs under data.webdataset" if tars else ""))
    return DataInfo(root, read_json(path))


@dataclass
class ImageSet:
    """Images (list of uint8 HxWxC arrays; any sizes), labels and keys of one split."""

    images: list[np.ndarray]
    labels: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.images)


def _record(info: DataInfo, split: str, path: ShardLocation) -> dict:
    name = shard_basename(path)
    return next(r for r in info.manifest["splits"][split]["shards"] if r["name"] == name)


REIMPORT_HINT = ("; restore it, or import again to train on the shards as they are now: rerun with --from data "
                 "(every stage is redone), after `selftrain data ... --out DIR` again where the config names the "
                 "import (data.source: shards: --from data alone reads the same import)")


def verify_shard(info: DataInfo, split: str, path: ShardLocation, streamed: Fingerprint | None = None) -> None:
    """The shard's bytes match the manifest's sha256: a local file is hashed here, a URL's bytes are
    `streamed` (hashed while the caller read the shard to its end)."""
    record = _record(info, split, path)
    if streamed is not None:
        if streamed.sha256 != record["sha256"]:
            raise ShardError(f"shard {path} streamed {streamed.size} bytes that do not match the sha256 in "
                             f"{info.root / MANIFEST} (changed since the data stage, or corrupt){REIMPORT_HINT}")
        return
    if not path.exists():
        raise ShardError(f"shard {path} listed in {info.root / MANIFEST} is missing")
    if sha256_file(path) != record["sha256"]:
        raise ShardError(f"shard {path} does not match the sha256 in {info.root / MANIFEST} (changed or corrupt)"
                         f"{REIMPORT_HINT}")


def load_labeled_split(info: DataInfo, split: str) -> ImageSet:
    """Decode a labeled split (labeled/holdout/test) strictly into memory."""
    images, labels, keys = [], [], []
    image_keys, label_key, classes = info.image_keys, info.label_key, info.classes
    for path in info.shard_paths(split):
        streamed = None if isinstance(path, Path) else Fingerprint()
        if streamed is None:
            verify_shard(info, split, path)
        for sample in iter_shard(path, on_error="raise", fingerprint=streamed):
            images.append(decode_image(sample, path, info.mode, image_keys))
            labels.append(decode_label(sample, path, info.num_classes, label_key, classes))
            keys.append(str(sample["__key__"]))
        if streamed is not None:
            verify_shard(info, split, path, streamed)
    expected = info.count(split)
    if len(images) != expected:
        raise ShardError(f"split '{split}' in {info.root}: read {len(images)} samples, manifest says {expected}")
    return ImageSet(images, np.asarray(labels, dtype=np.int64), keys)


def load_unlabeled_split(info: DataInfo) -> tuple[ImageSet, ReadProblems]:
    """Decode the unlabeled pool into memory, skip-and-count: a bad sample or a truncated shard is
    recorded in the returned problems, never fatal. Labels are -1 (the pool's are never read). A key met
    again (in its shard or a later one) is skipped and recorded, as pseudo-labeling and selection skip it:
    teacher logits are joined by key, so a second image under one key would take the first one's."""
    images, keys = [], []
    problems = ReadProblems()
    seen: set[str] = set()
    for path in info.shard_paths("unlabeled"):
        for sample in iter_shard(path, on_error="skip", problems=problems):
            key = str(sample["__key__"])
            if key in seen:
                problems.skipped.append({"shard": shard_basename(path), "key": key,
                                         "reason": "duplicate __key__ (the first sample under it is kept)"})
                continue
            seen.add(key)
            try:
                images.append(decode_image(sample, path, info.mode, info.image_keys))
            except ShardError as exc:
                problems.skipped.append({"shard": shard_basename(path), "key": key, "reason": str(exc)})
                continue
            keys.append(key)
    return ImageSet(images, np.full(len(images), -1, dtype=np.int64), keys), problems


def channel_stats(images: list[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units (stored with the checkpoint)."""
    flat = np.concatenate([im.reshape(-1, im.shape[-1]) for im in images]).astype(np.float64) / 255.0
    return tuple(float(x) for x in flat.mean(0)), tuple(float(max(x, 1e-3)) for x in flat.std(0))
