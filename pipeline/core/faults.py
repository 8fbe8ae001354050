"""Fault injection for the kill-and-resume tests.

Setting `SELFTRAIN_KILL_AT_STEP=N` (training) or `SELFTRAIN_KILL_AT_BATCH=N`
(pseudo-labeling) makes the process SIGKILL itself right after that step or
batch: the same abrupt death as a preempted job, at a reproducible point.
"""

from __future__ import annotations

import os
import signal


def env_name(point: str) -> str:
    return f"SELFTRAIN_KILL_AT_{point.upper()}"


def kill_point(point: str, count: int) -> None:
    """`SELFTRAIN_KILL_SIGNAL=SIGSTOP` freezes the process there instead (a hung peer, for the peer watch's test)."""
    value = os.environ.get(env_name(point))
    if value is not None and int(value) == count:
        os.kill(os.getpid(), getattr(signal, os.environ.get("SELFTRAIN_KILL_SIGNAL", "SIGKILL")))
