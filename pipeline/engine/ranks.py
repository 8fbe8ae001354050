"""Several processes agree before they work: on any error one of them meets, on the settings, on the run
directory.

Without this, a process that stops alone (its node lacks the config file or a data path, or rank 0 refuses
a changed config while the others wait at a barrier) left the others waiting in their next collective until
the process group's timeout, then failing with an error that named no rank; and processes started with other
settings trained with them without a word (another learning rate steps its own replica, another seed draws
another data order, and only rank 0's weights are saved).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, TypeVar

from accelerate.utils import broadcast_object_list, gather_object

from pipeline.core.rundir import input_differences

T = TypeVar("T")


class RankError(RuntimeError):
    """Another process stopped, or was started otherwise; the message names its rank and host."""


def all_or_none(state, error: Exception | None) -> None:
    """A collective every rank reaches: when any rank brings an error, every rank raises (the rank's own
    error where it has one, else a RankError naming the first rank that failed and its message)."""
    if state.num_processes == 1:
        if error is not None:
            raise error
        return
    mine = None if error is None else (state.process_index, socket.gethostname(), str(error))
    failed = [found for found in gather_object([mine]) if found is not None]
    if error is not None:
        error.raised_on_every_rank = True  # type: ignore[attr-defined]
        raise error
    if failed:
        rank, host, message = failed[0]
        stopped = RankError(message if message.startswith(f"process {rank} ") else
                            f"process {rank} (on {host}) stopped: {message}")
        stopped.raised_on_every_rank = True  # type: ignore[attr-defined]
        raise stopped


def raised_on_every_rank(error: BaseException) -> bool:
    """Whether `error` came through `all_or_none` under several processes: every rank is handling it now, so
    a collective in their error handling is safe (elsewhere a rank may still sit in the training step's)."""
    return bool(getattr(error, "raised_on_every_rank", False))


def on_every_rank(state, work: Callable[[], T]) -> T:
    """`work()` on every rank, then `all_or_none`: one rank's failure stops them all with its message."""
    try:
        result = work()
    except Exception as error:  # noqa: BLE001 - re-raised on this rank, named on the others
        all_or_none(state, error)
        raise
    all_or_none(state, None)
    return result


def check_same_settings(state, settings: dict) -> None:
    """Every rank was started with rank 0's `settings` (the resolved config, --only, --from)."""
    if state.num_processes == 1:
        return
    gathered = gather_object([settings])
    error = None
    diffs = input_differences(gathered[0], settings)
    if diffs:
        error = RankError(f"process {state.process_index} (on {socket.gethostname()}) was started with other "
                          f"settings than process 0 ({'; '.join(diffs[:5])}{'; ...' if len(diffs) > 5 else ''}); "
                          "start every process with the same config, --set, --preset, --only and --from")
    all_or_none(state, error)


def check_same_run_dir(state, root: Path) -> None:
    """Every rank reads the lock file rank 0 wrote when it took the run (its pid and host): the run directory
    is one directory on every node (a directory of each node's own failed only after the teacher had trained,
    with a misleading message)."""
    if state.num_processes == 1:
        return
    lock = root / "lock"
    expected = [lock.read_text() if state.is_main_process else None]
    broadcast_object_list(expected, from_process=0)
    mine = lock.read_text() if lock.exists() else None
    error = None
    if mine != expected[0]:
        error = RankError(f"process {state.process_index} (on {socket.gethostname()}): {root} is not the run "
                          f"directory process 0 holds (its lock reads {mine!r}, not {expected[0]!r}); put --run-dir "
                          "on storage every node shares, at the same path")
    all_or_none(state, error)


def on_main_rank(state, work: Callable[[], None]) -> None:
    """`work()` on rank 0 while the others wait, then `all_or_none`: a refusal there (a changed config, a
    lock held by another run, a failed one-process stage) stops every rank with its message, where the
    others used to fail on the broken barrier and be blamed for it."""
    error = None
    if state.is_main_process:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - re-raised on rank 0, named on the others
            error = exc
    all_or_none(state, error)
