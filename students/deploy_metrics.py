"""Deployment metrics over models and result rows: MACs/params, Pareto front, budget pick, plot.

A "row" is a plain dict describing one deployable model (e.g. ``{"name": ..., "accuracy": ...,
"batch1_ms": ..., "macs": ...}``); the functions take the keys to compare as arguments.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["best_under_budget", "count_macs_and_params", "int8_speed_vs_fp32", "pareto_front", "pareto_plot"]


def count_macs_and_params(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Multiply-accumulates and parameter count of `model` for one (batch 1) input of `input_shape`.

    Uses ``torch_pruning.utils.count_ops_and_params`` on a CPU deep copy in eval mode, so the
    caller's model (its device, mode and hooks) is untouched.
    """
    import torch_pruning as tp

    probe = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(1, *input_shape)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(probe, example)
    return int(macs), int(params)


def _finite(row: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for k in keys)


def pareto_front(rows: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """Rows that no other row dominates (lower `x` is better, higher `y` is better), sorted by `x`.

    A row is dominated when another row is at least as good on both keys and better on one.
    Rows missing a key or holding a non-finite value are ignored; exact duplicates all stay.
    """
    candidates = [r for r in rows if _finite(r, x, y)]
    front = [
        r for r in candidates
        if not any(o[x] <= r[x] and o[y] >= r[y] and (o[x] < r[x] or o[y] > r[y]) for o in candidates)
    ]
    return sorted(front, key=lambda r: (r[x], -r[y]))


def best_under_budget(
    rows: list[dict[str, Any]], latency_key: str, budget_ms: float, accuracy_key: str
) -> dict[str, Any] | None:
    """The most accurate row with ``row[latency_key] <= budget_ms``; ties go to the faster one.

    Returns None when no row fits the budget.
    """
    fitting = [r for r in rows if _finite(r, latency_key, accuracy_key) and r[latency_key] <= budget_ms]
    if not fitting:
        return None
    return max(fitting, key=lambda r: (r[accuracy_key], -r[latency_key]))


def int8_speed_vs_fp32(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model with a kept int8 onnxruntime row: its speed-ups over the fp32 onnxruntime row
    (batch 1: fp32 ms / int8 ms; batch 64: int8 img/s / fp32 img/s) and `slower_at`, the batch sizes
    where int8 measured slower (a speed-up below 1), which the deployment table names."""
    fp32 = {r["model"]: r for r in rows if r.get("runtime") == "onnxruntime" and r.get("precision") == "fp32"}
    found = []
    for r in rows:
        ref = fp32.get(r.get("model"))
        if r.get("runtime") != "onnxruntime" or r.get("precision") != "int8" or "rejected" in r or ref is None:
            continue
        batch1 = ref["batch1_ms"] / r["batch1_ms"]
        batch64 = r["batch64_img_s"] / ref["batch64_img_s"]
        found.append({"model": r["model"], "batch1_speedup": round(batch1, 3), "batch64_speedup": round(batch64, 3),
                      "slower_at": [b for b, x in ((1, batch1), (64, batch64)) if x < 1.0]})
    return found


def pareto_plot(rows: list[dict[str, Any]], path: Path, x: str, y: str, label: str) -> None:
    """Scatter of every row (`x` against `y`, each annotated with ``row[label]``), the Pareto front
    joined by a line; written as a PNG atomically."""
    from pipeline.core.plots import plt, save_figure

    points = [r for r in rows if _finite(r, x, y)]
    front = pareto_front(points, x, y)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r[x] for r in points], [r[y] for r in points], color="tab:gray", s=22, label="models")
    if front:
        ax.plot([r[x] for r in front], [r[y] for r in front], "o-", color="tab:red", label="Pareto front")
    for r in points:
        ax.annotate(str(r.get(label, "")), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
