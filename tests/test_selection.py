"""Noisy Student selection: threshold, class balancing, duplication, determinism, bounded memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from teachers import selection
from teachers.selection import SelectionSpec, plan_selection


def hand_table() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """4 classes over 3 shards. Above 0.3: class 0 has 5 rows, class 1 two, class 2 none, class 3 one."""
    return [
        ("s0", np.array([0.90, 0.30, 0.2999, 0.80, 0.50]), np.array([0, 1, 0, 0, 3])),
        ("s1", np.array([0.95, 0.10, 0.40, 0.70]), np.array([0, 2, 1, 0])),
        ("s2", np.array([0.35, 0.25, 0.60]), np.array([0, 3, 0])),
    ]


def test_threshold_keeps_exactly_rows_at_or_above_it():
    plan = plan_selection(hand_table(), num_classes=4)  # min_confidence 0.3, no balancing
    assert plan.repeats["s0"].tolist() == [1, 1, 0, 1, 1]  # 0.30 kept, 0.2999 dropped
    assert plan.repeats["s1"].tolist() == [1, 0, 1, 1]
    assert plan.repeats["s2"].tolist() == [1, 0, 1]
    assert all(r.dtype == np.int32 for r in plan.repeats.values())
    assert plan.counts_total.tolist() == [7, 2, 1, 2]
    assert plan.counts_confident.tolist() == [6, 2, 0, 1]
    assert plan.unique_kept.tolist() == plan.copies.tolist() == [6, 2, 0, 1]
    np.testing.assert_allclose(plan.class_threshold, [0.35, 0.30, np.nan, 0.50])


def test_balancing_hand_checked():
    plan = plan_selection(hand_table(), num_classes=4, per_class=3, seed=0)
    # class 0: confident 0.95, 0.90, 0.80, 0.70, 0.60, 0.35 -> the top 3 (0.95 s1, 0.90 s0, 0.80 s0), once each
    assert plan.repeats["s0"][[0, 3]].tolist() == [1, 1] and plan.repeats["s1"][0] == 1
    assert plan.repeats["s1"][3] == 0 and plan.repeats["s2"][[0, 2]].tolist() == [0, 0]
    # class 1: two rows -> floor(3/2) = 1 each, plus 3 mod 2 = 1 extra copy for one of them
    assert sorted([plan.repeats["s0"][1], plan.repeats["s1"][2]]) == [1, 2]
    # class 3: one row -> 3 copies; class 2: nothing above the threshold -> nothing
    assert plan.repeats["s0"][4] == 3
    assert plan.repeats["s0"][2] == 0 and plan.repeats["s1"][1] == 0 and plan.repeats["s2"][1] == 0
    assert plan.copies.tolist() == [3, 3, 0, 3]
    assert plan.unique_kept.tolist() == [3, 2, 0, 1]
    np.testing.assert_allclose(plan.class_threshold, [0.80, 0.30, np.nan, 0.50])
    json.dumps(plan.summary())


def test_duplication_counts_floor_and_remainder():
    # class 0 has 4 confident rows and per_class=10: 10 // 4 = 2 each, 10 % 4 = 2 rows get a third copy
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    plan = plan_selection([("a", conf[:2], np.zeros(2, int)), ("b", conf[2:], np.zeros(3, int))], 2, per_class=10)
    reps = np.concatenate([plan.repeats["a"], plan.repeats["b"]])
    assert reps[-1] == 0 and sorted(reps[:4].tolist()) == [2, 2, 3, 3] and reps.sum() == 10
    assert plan.copies.tolist() == [10, 0]


def test_ties_go_to_the_earlier_shard_then_row():
    shards = [("a", np.array([0.5, 0.9]), np.array([0, 0])), ("b", np.array([0.9, 0.5]), np.array([0, 0]))]
    plan = plan_selection(shards, 1, per_class=2)
    assert plan.repeats["a"].tolist() == [0, 1] and plan.repeats["b"].tolist() == [1, 0]
    plan = plan_selection(shards, 1, per_class=3)
    assert plan.repeats["a"].tolist() == [1, 1] and plan.repeats["b"].tolist() == [1, 0]


def random_shards(seed: int, num_classes: int = 5, num_shards: int = 9) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(num_shards):
        n = int(rng.integers(0, 900))
        # class 4 is rare; confidences on a coarse grid so ties across shards are common
        pred = rng.choice(num_classes, size=n, p=[0.3, 0.3, 0.2, 0.19, 0.01])
        out.append((f"shard-{s:03d}", np.round(rng.random(n), 2), pred))
    return out


def naive_kept(shards, num_classes: int, min_confidence: float, per_class: int) -> dict[tuple[int, int], int]:
    """All rows in memory: per class sort by (-conf, shard, row), keep the top per_class."""
    conf = np.concatenate([c for _, c, _ in shards])
    pred = np.concatenate([p for _, _, p in shards])
    shard = np.concatenate([np.full(len(c), i) for i, (_, c, _) in enumerate(shards)])
    row = np.concatenate([np.arange(len(c)) for _, c, _ in shards])
    kept = {}
    for c in range(num_classes):
        idx = np.flatnonzero((pred == c) & (conf >= min_confidence))
        idx = idx[np.lexsort((row[idx], shard[idx], -conf[idx]))][:per_class]
        for i in idx:
            kept[(int(shard[i]), int(row[i]))] = c
    return kept


@pytest.mark.parametrize("per_class", [1, 37, 400])
def test_streamed_plan_matches_in_memory_reference(per_class):
    shards = random_shards(seed=per_class)
    plan = plan_selection(iter(shards), 5, min_confidence=0.3, per_class=per_class, seed=7)
    kept = naive_kept(shards, 5, 0.3, per_class)
    got = {(s, int(r)): int(plan.repeats[name][r]) for s, (name, _, _) in enumerate(shards)
           for r in np.flatnonzero(plan.repeats[name])}
    assert set(got) == set(kept)
    for c in range(5):
        reps = np.array([got[k] for k, cls in kept.items() if cls == c], int)
        n = len(reps)
        assert n == min(per_class, int(plan.counts_confident[c])) == plan.unique_kept[c]
        if n:
            base, extra = divmod(per_class, n)
            assert reps.sum() == per_class == plan.copies[c]
            assert set(reps.tolist()) <= {base, base + 1} and int((reps == base + 1).sum()) == extra
    assert plan.counts_total.sum() == sum(len(c) for _, c, _ in shards)


def test_pool_stays_bounded(monkeypatch):
    sizes = []
    original = selection._Pool.add

    def spy(self, *args):
        original(self, *args)
        sizes.append(self.size)

    monkeypatch.setattr(selection._Pool, "add", spy)
    plan_selection(random_shards(seed=3, num_shards=20), 5, per_class=20)
    assert len(sizes) == 20 and max(sizes) <= 2 * 5 * 20


def test_seed_changes_only_the_extra_copies():
    shards = random_shards(seed=11)
    a = plan_selection(shards, 5, per_class=400, seed=1)
    b = plan_selection(shards, 5, per_class=400, seed=1)
    assert all(np.array_equal(a.repeats[k], b.repeats[k]) for k in a.repeats)
    differs = False
    for seed in (2, 3, 4):
        c = plan_selection(shards, 5, per_class=400, seed=seed)
        assert c.copies.tolist() == a.copies.tolist() and c.unique_kept.tolist() == a.unique_kept.tolist()
        for k in a.repeats:
            assert np.array_equal(a.repeats[k] > 0, c.repeats[k] > 0)
            assert np.abs(a.repeats[k] - c.repeats[k]).max(initial=0) <= 1
            differs |= not np.array_equal(a.repeats[k], c.repeats[k])
    assert differs


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="shard 'a' appears twice"):
        plan_selection([("a", np.ones(1), np.zeros(1, int))] * 2, 2)
    with pytest.raises(ValueError, match=r"shard 'x': predictions must be integer classes in \[0, 2\)"):
        plan_selection([("x", np.ones(1), np.array([2]))], 2)
    with pytest.raises(ValueError, match="shard 'x': non-finite confidence at row 1"):
        plan_selection([("x", np.array([0.5, np.nan]), np.array([0, 1]))], 2)
    with pytest.raises(ValueError, match="per_class"):
        SelectionSpec(per_class=0)
    with pytest.raises(ValueError, match="min_confidence"):
        plan_selection([], 2, min_confidence=1.5)
