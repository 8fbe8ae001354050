"""Noisy Student selection: a confidence threshold, then class balancing, streamed over shards.

Recipe (Xie et al. 2020, official `filter_unlabel.py`): keep images whose top-1 confidence is at
least `min_confidence`; with `per_class` set, each predicted class gets `per_class` images: the
most confident `per_class` if it has that many, otherwise every kept image is repeated
floor(per_class / n_c) times and (per_class mod n_c) of them, drawn with the seed, get one more.
The official code instead picks a per-class threshold on a 0.01 grid and rounds fractional copies
per image at random, so its totals are only about `per_class`; here they are exact.

Memory: one pass over the shards keeps, per class, only the best `per_class` candidates seen so
far (a pool of at most 2 * num_classes * per_class rows, pruned when full) plus one int32 repeat
array per shard (the plan itself); the confidences of a shard are dropped once it is processed.
Ties in confidence go to the earlier shard, then the earlier row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class SelectionSpec:
    min_confidence: float = 0.3
    per_class: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.min_confidence, (int, float)) and 0.0 <= self.min_confidence <= 1.0):
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence!r}")
        if self.per_class is not None and (isinstance(self.per_class, bool)
                                           or not isinstance(self.per_class, (int, np.integer))
                                           or self.per_class < 1):
            raise ValueError(f"per_class must be None or an integer >= 1, got {self.per_class!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class SelectionPlan:
    """Per shard an int32 repeat count per row (0 = dropped), plus per-class (C,) summaries.

    `class_threshold[c]` is the lowest confidence kept for class c (NaN when none is kept): the
    effective per-class threshold that balancing produced.
    """

    spec: SelectionSpec
    num_classes: int
    repeats: dict[str, np.ndarray]
    counts_total: np.ndarray
    counts_confident: np.ndarray
    unique_kept: np.ndarray
    copies: np.ndarray
    class_threshold: np.ndarray

    def summary(self) -> dict:
        """JSON-ready summary (for metrics.json / the selection report)."""
        return {
            "min_confidence": self.spec.min_confidence, "per_class": self.spec.per_class, "seed": self.spec.seed,
            "num_shards": len(self.repeats),
            "total": int(self.counts_total.sum()), "confident": int(self.counts_confident.sum()),
            "unique_kept": int(self.unique_kept.sum()), "copies": int(self.copies.sum()),
            "per_class_table": [
                {"class": c, "total": int(self.counts_total[c]), "confident": int(self.counts_confident[c]),
                 "unique_kept": int(self.unique_kept[c]), "copies": int(self.copies[c]),
                 "threshold": None if np.isnan(self.class_threshold[c]) else float(self.class_threshold[c])}
                for c in range(self.num_classes)],
        }


def _check_shard(name: str, conf: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    conf, pred = np.asarray(conf), np.asarray(pred)
    if conf.ndim != 1 or pred.shape != conf.shape:
        raise ValueError(f"shard {name!r}: confidence {conf.shape} and prediction {pred.shape} must be equal 1-d")
    if conf.size and not np.isfinite(conf).all():
        raise ValueError(f"shard {name!r}: non-finite confidence at row {int(np.argmin(np.isfinite(conf)))}")
    if pred.size and (pred.dtype.kind not in "iu" or pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"shard {name!r}: predictions must be integer classes in [0, {num_classes})")
    return conf.astype(np.float64), pred.astype(np.int64)


class _Pool:
    """Best `per_class` candidates per class: parallel arrays conf, shard, row, cls."""

    def __init__(self, num_classes: int, per_class: int) -> None:
        self.c, self.k = num_classes, per_class
        self.cutoff = np.full(num_classes, -np.inf)   # k-th best conf of a full class, else -inf
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.size = 0
        self.limit = 2 * num_classes * per_class

    def add(self, shard: int, conf: np.ndarray, pred: np.ndarray, rows: np.ndarray) -> None:
        # A full class admits only strictly better rows: equal ones lose to the earlier shard/row.
        beats = conf > self.cutoff[pred]
        if beats.any():
            part = (conf[beats], np.full(int(beats.sum()), shard, np.int64), rows[beats], pred[beats])
            self.parts.append(part)
            self.size += len(part[0])
        if self.size > self.limit:
            self.prune()

    def prune(self) -> tuple[np.ndarray, ...]:
        """Keep the top k per class; returns arrays sorted by (class, conf desc, shard, row)."""
        if not self.parts:
            empty = np.zeros(0, np.int64)
            return np.zeros(0), empty, empty, empty
        conf, shard, row, cls = (np.concatenate(x) for x in zip(*self.parts))
        order = np.lexsort((row, shard, -conf, cls))
        conf, shard, row, cls = conf[order], shard[order], row[order], cls[order]
        start = np.searchsorted(cls, np.arange(self.c))
        rank = np.arange(len(cls)) - start[cls]
        keep = rank < self.k
        conf, shard, row, cls = conf[keep], shard[keep], row[keep], cls[keep]
        self.parts, self.size = [(conf, shard, row, cls)], len(conf)
        full = np.bincount(cls, minlength=self.c) == self.k
        last = np.searchsorted(cls, np.arange(self.c), side="right") - 1
        self.cutoff = np.where(full, conf[np.clip(last, 0, None)] if len(conf) else -np.inf, -np.inf)
        return conf, shard, row, cls


def _copies(cls: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Repeat counts for the kept rows (sorted by class): floor share + seeded remainder."""
    n = np.bincount(cls, minlength=num_classes)
    base = per_class // np.maximum(n, 1)
    extra = per_class % np.maximum(n, 1)
    # A random rank within each class; the `extra[c]` lowest ranks get one more copy.
    keys = np.random.default_rng(seed).random(len(cls))
    order = np.lexsort((keys, cls))
    rank = np.empty(len(cls), np.int64)
    rank[order] = np.arange(len(cls)) - np.searchsorted(cls[order], cls[order])
    return (base[cls] + (rank < extra[cls])).astype(np.int32)


def plan_selection(shards: Iterable[tuple[str, np.ndarray, np.ndarray]], num_classes: int,
                   min_confidence: float = 0.3, per_class: int | None = None, seed: int = 0) -> SelectionPlan:
    """One streamed pass over (shard name, top-1 confidence (n,), predicted class (n,)) tuples."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    spec = SelectionSpec(float(min_confidence), per_class, seed)
    pool = _Pool(num_classes, per_class) if per_class is not None else None
    names: list[str] = []
    repeats: dict[str, np.ndarray] = {}
    total = np.zeros(num_classes, np.int64)
    confident = np.zeros(num_classes, np.int64)
    low = np.full(num_classes, np.inf)
    for name, conf, pred in shards:
        if name in repeats:
            raise ValueError(f"shard {name!r} appears twice")
        conf, pred = _check_shard(name, conf, pred, num_classes)
        ok = conf >= spec.min_confidence
        total += np.bincount(pred, minlength=num_classes)
        confident += np.bincount(pred[ok], minlength=num_classes)
        repeats[name] = ok.astype(np.int32) if pool is None else np.zeros(len(conf), np.int32)
        if pool is None:
            np.minimum.at(low, pred[ok], conf[ok])
        else:
            pool.add(len(names), conf[ok], pred[ok], np.flatnonzero(ok))
        names.append(name)

    if pool is None:
        unique = copies = confident.copy()
    else:
        kconf, kshard, krow, kcls = pool.prune()
        reps = _copies(kcls, num_classes, spec.per_class, spec.seed)
        for s in np.unique(kshard):
            mine = kshard == s
            repeats[names[s]][krow[mine]] = reps[mine]
        unique = np.bincount(kcls, minlength=num_classes)
        copies = np.bincount(kcls, weights=reps, minlength=num_classes).astype(np.int64)
        np.minimum.at(low, kcls, kconf)
    threshold = np.where(np.isinf(low), np.nan, low)
    return SelectionPlan(spec, int(num_classes), repeats, total, confident, unique, copies, threshold)
