"""May a command write where `--out` points? Checked before any work, so a refusal changes nothing.

A single output file (`summarize --out table.md`, `augment preview --out grid.png`) is replaced only
when it is missing or when the file there carries the command's own mark (the caller says how to
see it): re-running a command refreshes its output, and nobody's config or photo is overwritten.
An output directory (`data ... --out DIR`, `compare --out DIR`) must not be an existing file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


class OutputPathError(ValueError):
    """An output path given on the command line cannot be written; the message names the flag and the path."""


def _refuse_file_ancestor(path: Path, flag: str) -> None:
    """A parent of `path` that exists but is a file (`--out notes.txt/grid.png`) cannot hold it; the directory
    that would hold what is made must be writable (a root-owned folder gave a PermissionError traceback)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{flag} {path}: {parent} is a file, not a directory; nothing was written")
            holder = path if path.is_dir() else parent
            if not os.access(holder, os.W_OK | os.X_OK):
                raise OutputPathError(f"{flag} {path}: {holder} is not writable for this user; nothing was written. "
                                      "Choose another place")
            return


def check_output_file(path: Path, *, flag: str, suffix: str, command: str,
                      written_by_us: Callable[[Path], bool]) -> None:
    """Refuse `path` unless it ends in `suffix` and is new or a file `command` wrote (`written_by_us`)."""
    if path.is_symlink():
        raise OutputPathError(f"{flag} {path} is a symbolic link; nothing was written. "
                              "Give a new file name or the file itself")
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; give a file name ending in {suffix}")
    if path.suffix.lower() != suffix:
        raise OutputPathError(f"{flag} {path}: {command} writes a {suffix} file; "
                              f"give a file name ending in {suffix}")
    if path.exists():
        if not path.is_file():
            raise OutputPathError(f"{flag} {path} exists and is not a regular file; nothing was written")
        if not written_by_us(path):
            raise OutputPathError(f"{flag} {path} already exists and was not written by {command}; "
                                  "nothing was changed. Remove it yourself or choose another file name")
    _refuse_file_ancestor(path, flag)


def check_output_dir(path: Path, *, flag: str = "--out") -> None:
    """Refuse a directory path that is an existing file (or lies under one)."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; give a directory")
    _refuse_file_ancestor(path, flag)
