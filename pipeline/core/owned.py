"""Which files under a directory this tool wrote, so that it never removes anything else.

An import (or any writer that may be interrupted and redone) first records the
relative paths it is about to write in a journal, `.selftrain-owned.json`, and
only then writes them. A redo removes exactly the journaled files (and their
`.tmp` siblings); any other file found in the directory is refused by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.core.atomic import WriteFailed, read_json, write_json

JOURNAL = ".selftrain-owned.json"
MAX_NAMED = 5


class ForeignFilesError(RuntimeError):
    """A directory the tool would write into holds files it did not write."""


def owned_paths(directory: Path) -> set[str]:
    """Relative paths the journal in `directory` claims (empty without a journal)."""
    path = directory / JOURNAL
    if not path.exists():
        return set()
    try:
        return set(read_json(path)["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ForeignFilesError(f"{path}: not a readable selftrain journal ({exc}); "
                                "remove it by hand if the directory is yours to clear") from None


def foreign_files(directory: Path, owned: set[str], tolerated: Iterable[str] = ()) -> list[str]:
    """Files under `directory` that are neither owned, the `.tmp` of an owned one, nor tolerated names."""
    if not directory.exists():
        return []
    allowed = owned | {name + ".tmp" for name in owned} | {JOURNAL, JOURNAL + ".tmp"} | set(tolerated)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if not p.is_dir() and str(p.relative_to(directory)) not in allowed)


def describe_foreign(directory: Path, names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED]) + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")
    return f"{directory} holds files this tool did not write ({shown})"


def refuse_foreign(directory: Path, tolerated: Iterable[str] = ()) -> set[str]:
    """Raise if `directory` holds files the journal does not claim; return the claimed ones."""
    previous = owned_paths(directory)
    foreign = foreign_files(directory, previous, tolerated)
    if foreign:
        raise ForeignFilesError(describe_foreign(directory, foreign) +
                                "; nothing was changed. Choose an empty or new output directory")
    return previous


def claim(directory: Path, files: Iterable[str], tolerated: Iterable[str] = ()) -> None:
    """Make `directory` ready for writing `files`: refuse foreign files, remove our own leftovers.

    Leftovers are the files a previous, interrupted writer journaled. The new list is
    journaled before anything is written, so a crash at any point leaves a directory
    whose every file is either journaled or foreign.
    """
    previous = refuse_foreign(directory, tolerated)
    for name in sorted(previous):
        for path in (directory / name, directory / (name + ".tmp")):
            path.unlink(missing_ok=True)
    files = sorted(set(files) | previous)  # still ours until the new write replaces them
    write_json(directory / JOURNAL, {"files": files})


@contextlib.contextmanager
def one_writer(directory: Path, what: str) -> Iterator[None]:
    """Hold an flock on `directory` itself (a lock file inside would be a file the journal does not claim)
    while `what` writes there: a second writer (the same import started by every job of an array) waits for
    the first, then finds the finished import and reuses it. A directory made here and left empty (the writer
    refused its input) is removed again."""
    made = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed(f"cannot create {directory}: {exc.strerror}; nothing was written") from None
    handle = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what}: another process is writing {directory}; waiting for it to finish", file=sys.stderr,
                  flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # NFS locks a directory only as a file opened for writing; Lustre without -o flock
            print(f"{what}: warning: cannot lock {directory} ({exc.strerror}); do not start a second writer into "
                  "it before this one finishes", file=sys.stderr, flush=True)
        yield
    except BaseException:
        if made and not any(directory.iterdir()):
            directory.rmdir()
        raise
    finally:
        os.close(handle)
