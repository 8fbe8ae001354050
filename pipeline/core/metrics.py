"""Classification metrics on logits: top-1, per-class accuracy, ECE, NLL."""

from __future__ import annotations

import numpy as np
import torch


def softmax_np(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE with `bins` equal-width confidence bins (Guo et al. 2017): sum_b |B|/N * |acc_b - conf_b|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    probs = softmax_np(logits)
    pred = probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    confidence = probs.max(1)
    per_class = {name: float(correct[labels == c].mean()) if (labels == c).any() else None
                 for c, name in enumerate(class_names)}
    nll = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits.astype(np.float32)),
                                                  torch.from_numpy(labels)).item())
    return {
        "top1": float(correct.mean()),
        "ece": expected_calibration_error(confidence, correct, bins=15),
        "nll": nll,
        "mean_confidence": float(confidence.mean()),
        "num_test": int(len(labels)),
        "per_class": per_class,
    }
