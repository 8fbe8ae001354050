"""Progress bars: tqdm on a terminal, a refresh every 30 s when stderr goes to a file.

tqdm refreshes up to ten times a second; in a log file (a batch job, `make demo > log`) every refresh is
kept: a 17-minute `make demo` wrote 3,175 of them (356 KB on 64 lines). Off a terminal, one refresh every
LOG_INTERVAL_S seconds still shows the rate and the time left.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)`, refreshed at most every LOG_INTERVAL_S seconds when stderr is not a terminal,
    unless the environment sets tqdm's own `TQDM_MININTERVAL` (bench/crash_matrix.py reads every step off the log)."""
    if not sys.stderr.isatty() and "TQDM_MININTERVAL" not in os.environ:
        options.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **options)
