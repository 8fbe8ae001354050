"""Wall time of a stage over every invocation, interrupted ones included.

While a stage runs, a daemon thread rewrites `RUN/<stage>/wall_time.json` every `HEARTBEAT_S`
seconds (more often in its first seconds) with the total so far, so a SIGKILL loses at most one heartbeat
of the count.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType

from pipeline.core.atomic import WriteFailed, read_json, write_json

HEARTBEAT_S = 10.0


class StageClock:
    """Context manager: adds this invocation's seconds to `path` (and counts the invocation)."""

    def __init__(self, path: Path, heartbeat_s: float = HEARTBEAT_S):
        self.path, self.heartbeat_s = path, heartbeat_s
        before = read_json(path) if path.exists() else {}
        self.seconds_before = float(before.get("seconds", 0.0))
        self.invocations = int(before.get("invocations", 0)) + 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"wall clock {path.parent.name}", daemon=True)
        self._started = 0.0

    def _write(self, running: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"seconds": round(self.seconds_before + time.perf_counter() - self._started, 2),
                               "invocations": self.invocations, "running": running})

    def _beat(self) -> None:
        """Beats after 1, 2, 4, 8 s, then every `heartbeat_s`: a stage killed in its first seconds showed 0 s."""
        wait = min(1.0, self.heartbeat_s)
        while not self._stop.wait(wait):
            self._write(running=True)
            wait = min(2 * wait, self.heartbeat_s)

    def __enter__(self) -> "StageClock":
        self._started = time.perf_counter()
        self._write(running=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        if exc is None:
            self._write(running=False)
            return
        try:  # the error in flight (a full disk, say) is the one to report, not this write's
            self._write(running=False)
        except (OSError, WriteFailed):
            pass


def read_clock(path: Path, heartbeat_s: float = HEARTBEAT_S) -> tuple[float, bool] | None:
    """(seconds so far, whether a process is timing the stage now), None when never timed (or damaged).

    Running now = the clock says running and beat within 3 heartbeats: a killed (or stopped) process leaves
    `running: true` behind, but its heartbeats stop."""
    try:
        clock = read_json(path)
        age = time.time() - os.stat(path).st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(clock, dict) or not isinstance(clock.get("seconds", 0.0), (int, float)):
        return None  # damaged: no time to show, as for an unreadable file
    running = bool(clock.get("running")) and age < 3 * heartbeat_s
    return float(clock.get("seconds", 0.0)) + (max(age, 0.0) if running else 0.0), running  # + since the last beat


def format_duration(seconds: float) -> str:
    """`2 h 05 min`, `14 min`, `40 s`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
