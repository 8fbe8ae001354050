"""Label sidecars: round trip logits -> sidecar -> soft/hard labels, top-k layout, atomicity, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.metrics import softmax_np
from teachers.sidecar import (Sidecar, SidecarError, confidence_and_prediction, hard_labels, read_sidecar,
                              read_sidecar_meta, soft_labels, write_sidecar)

# fp16 logits, stored relative to the row max, reproduce softmax(logits / T) to this absolute
# tolerance (measured max error ~1e-4 on logits around 50 with a spread of +-6).
FP16_ATOL = 1e-3
META = {"teacher_sha256": "abc", "source": {"shard": "unlabeled-000000.tar", "sha256": "def"},
        "count": 3, "skipped": [{"key": "x", "reason": "decode"}]}


def keys(n: int) -> list[str]:
    return [f"{i:06d}" for i in range(n)]


def random_logits(n: int = 64, c: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A large common offset: raw fp16 would keep only ~0.03 of precision here.
    return (rng.normal(size=(n, c)) * 2 + 50).astype(np.float32)


def test_full_round_trip_soft_labels_at_any_temperature(tmp_path):
    z = random_logits()
    write_sidecar(tmp_path / "s.npz", keys(64), z, META, topk=None)
    sc = read_sidecar(tmp_path / "s.npz")
    assert not sc.is_topk and len(sc) == 64 and sc.num_classes == 10
    assert list(sc.keys) == keys(64) and sc.meta == META and read_sidecar_meta(tmp_path / "s.npz") == META
    assert sc.logits.dtype == np.float16
    np.testing.assert_allclose(sc.full_logits(), z, atol=0.02)
    for t in (0.5, 1.0, 2.0, 4.0):
        soft = soft_labels(sc, t)
        assert soft.dtype == np.float32 and soft.shape == (64, 10)
        np.testing.assert_allclose(soft, softmax_np(z, t), atol=FP16_ATOL)
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
        conf, pred = confidence_and_prediction(sc, t)
        np.testing.assert_array_equal(pred, z.argmax(1))
        np.testing.assert_allclose(conf, softmax_np(z, t).max(1), atol=FP16_ATOL)


def test_file_holds_logits_not_probabilities(tmp_path):
    write_sidecar(tmp_path / "f.npz", keys(4), random_logits(4), META)
    write_sidecar(tmp_path / "t.npz", keys(4), random_logits(4), META, topk=3)
    with np.load(tmp_path / "f.npz") as npz:
        assert set(npz.files) == {"format", "keys", "num_classes", "meta", "shift", "logits"}
    with np.load(tmp_path / "t.npz") as npz:
        assert set(npz.files) == {"format", "keys", "num_classes", "meta", "shift", "topk_index", "topk_logits", "lse"}
        assert npz["topk_index"].dtype == np.int32 and npz["topk_logits"].dtype == np.float16
    # topk >= C stores the full layout
    write_sidecar(tmp_path / "k.npz", keys(4), random_logits(4), META, topk=10)
    assert not read_sidecar(tmp_path / "k.npz").is_topk


def test_hard_labels_and_smoothing_match_torch_cross_entropy(tmp_path):
    z = np.array([[1.0, 3.0, 2.0], [5.0, 0.0, 0.0]], np.float32)
    write_sidecar(tmp_path / "s.npz", ["a", "b"], z, {})
    sc = read_sidecar(tmp_path / "s.npz")
    np.testing.assert_array_equal(hard_labels(sc), [[0, 1, 0], [1, 0, 0]])
    third = 0.1 / 3
    np.testing.assert_allclose(hard_labels(sc, 0.1), [[third, 0.9 + third, third], [0.9 + third, third, third]])
    # Same targets as torch's CE label smoothing: soft CE with them equals F.cross_entropy(..., label_smoothing).
    x = torch.randn(2, 3)
    soft_ce = -(torch.from_numpy(hard_labels(sc, 0.1)) * torch.log_softmax(x, 1)).sum(1).mean()
    torch.testing.assert_close(soft_ce, torch.nn.functional.cross_entropy(x, torch.tensor([1, 0]), label_smoothing=0.1))
    with pytest.raises(ValueError, match="smoothing"):
        hard_labels(sc, 1.0)


def test_topk_is_exact_on_kept_classes_at_t1(tmp_path):
    z = random_logits(64, 20, seed=1)
    write_sidecar(tmp_path / "full.npz", keys(64), z, META)
    write_sidecar(tmp_path / "top.npz", keys(64), z, META, topk=5)
    full, top = read_sidecar(tmp_path / "full.npz"), read_sidecar(tmp_path / "top.npz")
    assert top.is_topk and top.topk_index.shape == (64, 5)
    np.testing.assert_array_equal(top.topk_index, np.argsort(-z, axis=1, kind="stable")[:, :5])
    ref = softmax_np(z, 1.0)
    kept = np.take_along_axis(soft_labels(top), top.topk_index, 1)
    np.testing.assert_allclose(kept, np.take_along_axis(ref, top.topk_index, 1), atol=FP16_ATOL)
    np.testing.assert_allclose(kept, np.take_along_axis(soft_labels(full), top.topk_index, 1), atol=FP16_ATOL)
    # the residual is spread evenly over the other 15 classes; rows sum to 1
    soft = soft_labels(top)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
    tail = np.ones_like(soft, bool)
    np.put_along_axis(tail, top.topk_index, False, 1)
    np.testing.assert_allclose(soft[tail].reshape(64, 15), (1 - kept.sum(1, keepdims=True)) / 15 * np.ones((1, 15)),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(hard_labels(top), hard_labels(full))
    conf, pred = confidence_and_prediction(top)
    np.testing.assert_array_equal(pred, z.argmax(1))
    np.testing.assert_allclose(conf, ref.max(1), atol=FP16_ATOL)


def test_topk_hand_checked_uniform_tail_is_exact_at_every_temperature(tmp_path):
    # probabilities 1/2, 1/4, 1/8, 1/8: top-2 keeps 1/2, 1/4; the residual 1/4 splits 1/8 + 1/8.
    z = np.log(np.array([[4.0, 2.0, 1.0, 1.0]], np.float32))
    write_sidecar(tmp_path / "t.npz", ["a"], z, {}, topk=2)
    sc = read_sidecar(tmp_path / "t.npz")
    np.testing.assert_allclose(soft_labels(sc), [[0.5, 0.25, 0.125, 0.125]], atol=1e-4)
    # T=2: weights sqrt(4), sqrt(2), 1, 1
    w = np.array([2.0, np.sqrt(2), 1.0, 1.0])
    np.testing.assert_allclose(soft_labels(sc, 2.0), [w / w.sum()], atol=1e-4)
    conf, pred = confidence_and_prediction(sc, 2.0)
    np.testing.assert_allclose(conf, [2.0 / w.sum()], atol=1e-4)
    assert pred.tolist() == [0]


def test_topk_approximation_at_other_temperatures_when_tail_is_small(tmp_path):
    rng = np.random.default_rng(2)
    n, c, k = 100, 100, 10
    z = rng.normal(size=(n, c)).astype(np.float32)
    boosted = np.argsort(rng.random((n, c)), axis=1)[:, :k]
    np.put_along_axis(z, boosted, np.take_along_axis(z, boosted, 1) + 10, 1)
    write_sidecar(tmp_path / "t.npz", keys(n), z, {}, topk=k)
    sc = read_sidecar(tmp_path / "t.npz")
    tail_mass = 1 - np.take_along_axis(softmax_np(z), sc.topk_index, 1).sum(1)
    assert tail_mass.max() < 2e-3  # the regime the tolerances below are stated for
    np.testing.assert_allclose(soft_labels(sc, 0.5), softmax_np(z, 0.5), atol=1e-3)
    np.testing.assert_allclose(soft_labels(sc, 2.0), softmax_np(z, 2.0), atol=1e-2)
    conf, pred = confidence_and_prediction(sc, 2.0)
    np.testing.assert_allclose(conf, soft_labels(sc, 2.0).max(1), rtol=1e-5)


def test_empty_shard_round_trips(tmp_path):
    for topk in (None, 3):
        write_sidecar(tmp_path / "e.npz", [], np.zeros((0, 10), np.float32), {"count": 0}, topk=topk)
        sc = read_sidecar(tmp_path / "e.npz")
        assert len(sc) == 0 and sc.num_classes == 10
        assert soft_labels(sc).shape == (0, 10) and hard_labels(sc).shape == (0, 10)
        assert confidence_and_prediction(sc)[0].shape == (0,)


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"

    def broken_savez(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        write_sidecar(path, keys(4), random_logits(4), META)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # an existing sidecar survives a failed rewrite untouched
    write_sidecar(path, keys(4), random_logits(4), META)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError):
        write_sidecar(path, keys(4), random_logits(4, seed=5), {"other": 1})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_corrupt_or_missing_sidecar_names_the_path(tmp_path):
    good = tmp_path / "good.npz"
    write_sidecar(good, keys(8), random_logits(8), META)
    cases = {"garbage.npz": b"not a sidecar at all", "truncated.npz": good.read_bytes()[:200]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SidecarError, match=name):
            read_sidecar(tmp_path / name)
        with pytest.raises(SidecarError, match=name):
            read_sidecar_meta(tmp_path / name)
    with pytest.raises(SidecarError, match="missing.npz: sidecar not found"):
        read_sidecar(tmp_path / "missing.npz")
    partial = tmp_path / "partial.npz"
    np.savez(partial, format=np.array(1), keys=np.array(["a"]), num_classes=np.array(2),
             meta=np.array("{}"), shift=np.zeros(1, np.float32))
    with pytest.raises(SidecarError, match=r"partial.npz: corrupt sidecar \(missing field 'topk_index'\)"):
        read_sidecar(partial)
    bad_meta = tmp_path / "bad_meta.npz"
    np.savez(bad_meta, meta=np.array("{oops"))
    with pytest.raises(SidecarError, match="bad_meta.npz.*'meta' is not JSON"):
        read_sidecar_meta(bad_meta)


def test_bad_input_is_refused_with_the_path(tmp_path):
    path = tmp_path / "s.npz"
    with pytest.raises(ValueError, match="s.npz: 3 keys for 4 logit rows"):
        write_sidecar(path, keys(3), random_logits(4), {})
    z = random_logits(4)
    z[2, 1] = np.nan
    with pytest.raises(ValueError, match="s.npz: non-finite logits for key '000002'"):
        write_sidecar(path, keys(4), z, {})
    with pytest.raises(ValueError, match="duplicate __key__ 'a'"):
        write_sidecar(path, ["a", "b", "a", "c"], random_logits(4), {})
    with pytest.raises(ValueError, match="meta is not JSON"):
        write_sidecar(path, keys(4), random_logits(4), {"x": object()})
    with pytest.raises(ValueError, match="topk"):
        write_sidecar(path, keys(4), random_logits(4), {}, topk=0)
    assert not path.exists()
    write_sidecar(path, keys(4), random_logits(4), {})
    with pytest.raises(ValueError, match="temperature"):
        soft_labels(read_sidecar(path), 0.0)
    assert isinstance(read_sidecar(path), Sidecar)
