"""Temperature scaling and the pseudo-label accuracy report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.metrics import classification_metrics, softmax_np
from teachers.calibration import (T_MAX, T_MIN, accuracy_above, accuracy_by_confidence, calibration_report,
                                  fit_temperature)


def calibrated(n: int = 4000, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (labels are drawn from it)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 1.5
    p = softmax_np(z)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, labels


def test_over_confident_logits_fit_t_near_3_and_ece_drops():
    z, y = calibrated()
    t = fit_temperature(3 * z, y)
    assert abs(t - 3) < 0.3
    report = calibration_report(3 * z, y, t)
    assert report["after"]["ece"] < report["before"]["ece"] / 3 and report["after"]["ece"] < 0.03
    assert report["after"]["nll"] < report["before"]["nll"]
    assert report["after"]["top1"] == report["before"]["top1"]  # T does not change the argmax
    assert report["after"]["mean_confidence"] < report["before"]["mean_confidence"]
    json.dumps(report)


def test_under_confident_logits_fit_t_below_1():
    z, y = calibrated(seed=1)
    assert abs(fit_temperature(z / 2, y) - 0.5) < 0.05


def test_before_matches_pipeline_metrics():
    z, y = calibrated(500, 4, seed=2)
    ref = classification_metrics(z.astype(np.float32), y, [str(i) for i in range(4)])
    before = calibration_report(z, y, 1.5)["before"]
    for key in ("ece", "top1", "mean_confidence", "nll"):
        assert before[key] == pytest.approx(ref[key], abs=1e-5)


def test_fit_stays_finite_at_the_bounds():
    y = np.arange(6) % 3
    separable = np.eye(3)[y] * 50
    assert fit_temperature(separable, y) == T_MIN
    assert fit_temperature(np.zeros((6, 3)), y) == T_MAX
    wrong = np.eye(3)[(y + 1) % 3] * 5  # confidently wrong everywhere: flatten as far as allowed
    assert fit_temperature(wrong, y) == T_MAX
    with pytest.raises(ValueError, match="labels must be in"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[0.0, np.nan]]), np.array([0]))


def test_accuracy_by_confidence_hand_checked():
    conf = np.array([0.1, 0.35, 0.5, 0.95, 1.0, 0.3])
    correct = np.array([0, 1, 0, 1, 1, 1], bool)
    bins = accuracy_by_confidence(conf, correct)
    assert [(b["lo"], b["hi"], b["count"], b["accuracy"]) for b in bins] == [
        (0.0, 0.3, 1, 0.0), (0.3, 0.5, 2, 1.0), (0.5, 0.7, 1, 0.0), (0.7, 0.9, 0, None), (0.9, 1.0, 2, 1.0)]
    assert [b["fraction"] for b in bins] == pytest.approx([1 / 6, 2 / 6, 1 / 6, 0, 2 / 6])
    json.dumps(bins)
    with pytest.raises(ValueError, match="edges"):
        accuracy_by_confidence(conf, correct, edges=(0.5, 0.3))


def test_accuracy_above_hand_checked():
    conf = np.array([0.1, 0.35, 0.5, 0.95, 1.0, 0.3])
    correct = np.array([0, 1, 0, 1, 1, 1])
    out = accuracy_above(conf, correct)
    assert out[0.3] == {"count": 5, "kept_fraction": pytest.approx(5 / 6), "accuracy": pytest.approx(0.8)}
    assert out[0.9] == {"count": 2, "kept_fraction": pytest.approx(2 / 6), "accuracy": 1.0}
    assert accuracy_above(conf, correct, (0.99999, 1.01))[1.01] == {"count": 0, "kept_fraction": 0.0, "accuracy": None}
