"""How far a training stage has come, for `selftrain status` (which reads it without importing torch).

The training loop's main process rewrites `progress.json` beside the stage's state directory
(`RUN/<stage>/progress.json`) every few seconds and after each saved state: the step it is at,
the total, the last step saved (where a rerun resumes) and this invocation's steps per second.
Pseudo-labeling writes the same file in shards (the sidecars on disk, every process's).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.atomic import read_json, write_json
from pipeline.core.wallclock import format_duration

PROGRESS_FILE = "progress.json"
WRITE_EVERY_S = 5.0


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    saved_step: int  # the step a rerun resumes from (0: no state saved yet)
    steps_per_s: float  # this invocation's rate, data waits included
    unit: str = "step"  # "shard" for pseudo-labeling, whose every finished shard is saved

    def running_text(self, age_s: float) -> str:
        """`step 280 of 8,448, about 1 h 55 min left` (the estimate counts the time since the file was written)."""
        text = f"{self.unit} {self.step:,} of {self.total:,}"
        if self.steps_per_s > 0 and self.step < self.total:
            left = max(0.0, (self.total - self.step) / self.steps_per_s - age_s)
            text += f", about {format_duration(left)} left"
        return text

    def stopped_text(self) -> str:
        if self.unit == "step":
            return f"resumes from step {self.saved_step:,} of {self.total:,}"
        return f"{self.saved_step:,} of {self.total:,} {self.unit}s done"


def progress_path(state_dir: Path) -> Path:
    """Where the loop that saves its state in `state_dir` reports its progress."""
    return state_dir.parent / PROGRESS_FILE


class ProgressWriter:
    """Rewrites the progress file at most every `every_s` seconds (always on a save): an atomic write
    with fsync every few seconds costs nothing next to a training step, every step would on a slow disk."""

    def __init__(self, path: Path | None, total: int, start_step: int, every_s: float = WRITE_EVERY_S,
                 unit: str = "step"):
        self.path, self.total, self.every_s, self.unit = path, total, every_s, unit
        self.start_step = self.saved_step = start_step
        self._started = self._written = time.perf_counter()

    def update(self, step: int, saved: bool = False) -> None:
        if self.path is None:
            return
        now = time.perf_counter()
        if saved:
            self.saved_step = step
        elif now - self._written < self.every_s:
            return
        rate = (step - self.start_step) / max(1e-9, now - self._started)
        write_json(self.path, asdict(Progress(step, self.total, self.saved_step, round(rate, 4), self.unit)))
        self._written = now


def read_progress(path: Path) -> tuple[Progress, float] | None:
    """(progress, seconds since it was written), None when absent or unreadable (status must not fail on it)."""
    try:
        fields = read_json(path)
        age = time.time() - path.stat().st_mtime
        return Progress(int(fields["step"]), int(fields["total"]), int(fields["saved_step"]),
                        float(fields["steps_per_s"]), str(fields.get("unit", "step"))), age
    except (OSError, ValueError, KeyError, TypeError):
        return None
