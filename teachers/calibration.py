"""Teacher calibration: temperature scaling (Guo et al. 2017) and confidence-binned accuracy.

Confidence thresholds such as Noisy Student's 0.3 assume calibrated probabilities; a teacher
trained with label smoothing is under-confident, one trained long without it over-confident.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.core.metrics import expected_calibration_error, softmax_np

T_MIN, T_MAX = 0.05, 20.0


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"logits must be a non-empty (N, C) array, got shape {z.shape}")
    if y.shape != (len(z),) or y.dtype.kind not in "iu":
        raise ValueError(f"labels must be {len(z)} integer class ids, got {y.dtype}{y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must be in [0, {z.shape[1]}), got range [{y.min()}, {y.max()}]")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    return z, y.astype(np.int64)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    s = z / temperature
    m = s.max(axis=1)
    lse = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
    return float((lse - s[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iters: int = 50) -> float:
    """T in [0.05, 20] minimising the mean NLL of softmax(logits / T).

    NLL is convex in b = 1/T with derivative mean(E_p[z] - z_y), which rises monotonically, so a
    bisection on its sign (in log b) finds the optimum without a step size; at a bound (all rows
    separable, or labels unrelated to logits) the bound is returned.
    """
    z, y = _check(logits, labels)
    z = z - z.max(axis=1, keepdims=True)
    z_true = z[np.arange(len(y)), y]

    def slope(log_b: float) -> float:
        p = softmax_np(z, 1.0 / np.exp(log_b))
        return float(((p * z).sum(axis=1) - z_true).mean())

    lo, hi = np.log(1.0 / T_MAX), np.log(1.0 / T_MIN)
    if slope(lo) >= 0:
        return T_MAX
    if slope(hi) <= 0:
        return T_MIN
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return float(1.0 / np.exp(0.5 * (lo + hi)))


def _metrics(z: np.ndarray, y: np.ndarray, temperature: float) -> dict:
    p = softmax_np(z, temperature)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return {"ece": expected_calibration_error(conf, correct, bins=15), "nll": _nll(z, y, temperature),
            "top1": float(correct.mean()), "mean_confidence": float(conf.mean())}


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE (15 bins), NLL, top-1 and mean confidence at T=1 ("before") and at `temperature` ("after")."""
    z, y = _check(logits, labels)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return {"temperature": float(temperature), "num": int(len(y)),
            "before": _metrics(z, y, 1.0), "after": _metrics(z, y, float(temperature))}


def _check_conf(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, ok = np.asarray(conf, dtype=np.float64), np.asarray(correct)
    if c.ndim != 1 or ok.shape != c.shape:
        raise ValueError(f"conf {c.shape} and correct {ok.shape} must be equal 1-d arrays")
    return c, ok.astype(np.float64)


def accuracy_by_confidence(conf: np.ndarray, correct: np.ndarray,
                           edges: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)) -> list[dict]:
    """Per bin [lo, hi) (the last bin includes hi): count, fraction of all rows, accuracy (None if empty)."""
    c, ok = _check_conf(conf, correct)
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or not (np.diff(e) > 0).all():
        raise ValueError(f"edges must be at least two increasing numbers, got {list(edges)!r}")
    nb = len(e) - 1
    which = np.searchsorted(e, c, side="right") - 1
    which[c == e[-1]] = nb - 1
    inside = (which >= 0) & (which < nb)
    count = np.bincount(which[inside], minlength=nb)
    hits = np.bincount(which[inside], weights=ok[inside], minlength=nb)
    n = max(len(c), 1)
    return [{"lo": float(e[b]), "hi": float(e[b + 1]), "count": int(count[b]), "fraction": float(count[b] / n),
             "accuracy": float(hits[b] / count[b]) if count[b] else None} for b in range(nb)]


def accuracy_above(conf: np.ndarray, correct: np.ndarray, thresholds: Sequence[float] = (0.3, 0.9)) -> dict:
    """{threshold: {count, kept_fraction, accuracy}} over rows with conf >= threshold."""
    c, ok = _check_conf(conf, correct)
    n = max(len(c), 1)
    out = {}
    for t in thresholds:
        keep = c >= t
        k = int(keep.sum())
        out[float(t)] = {"count": k, "kept_fraction": float(k / n), "accuracy": float(ok[keep].mean()) if k else None}
    return out
