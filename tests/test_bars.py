"""Progress bars refresh every 30 s when stderr is a file (a batch job's log), as often as tqdm likes on a terminal."""

import io
import os
import subprocess
import sys

from pipeline.core.bars import LOG_INTERVAL_S, progress_bar


def test_a_bar_writing_to_a_file_refreshes_at_the_log_interval(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    with progress_bar(total=3) as bar:
        assert bar.mininterval == LOG_INTERVAL_S == 30
    with progress_bar(total=3, mininterval=1.0) as bar:  # a caller's own interval stays
        assert bar.mininterval == 1.0


def test_a_bar_on_a_terminal_keeps_tqdms_interval(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress_bar(range(3)) as bar:
        assert bar.mininterval == 0.1 and list(bar) == [0, 1, 2]


def test_tqdms_own_environment_setting_wins_in_a_file():
    """bench/crash_matrix.py sets TQDM_MININTERVAL=0 to read every step off its runs' logs (tqdm reads the
    variable when it is imported: a fresh process)."""
    code = "from pipeline.core.bars import progress_bar; print(progress_bar(total=3).mininterval)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TQDM_MININTERVAL": "0"})
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) == 0
