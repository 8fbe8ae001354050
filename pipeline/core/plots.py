"""PNG charts for reports (matplotlib, headless), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.core.atomic import write_bytes  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def class_count_chart(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars per class: predicted total, above the threshold, after balancing (with copies)."""
    names = [str(r.get("name", r["class"])) for r in rows]
    series = [("predicted", "total"), ("confident", "confident"), ("after balancing", "copies")]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 3.6))
    for i, (label, key) in enumerate(series):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), names, rotation=35, ha="right")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)
