"""Atomic file writes: write `name.tmp`, fsync, `os.replace`.

A reader never sees a half-written file under its final name; a crash
leaves at most a stray `.tmp` that the next writer overwrites.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator


class WriteFailed(RuntimeError):
    """A file could not be written (disk full, read-only); the message names the errno and the path."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open `path.tmp` for binary writing; on success fsync and rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            try:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException:
                _close_quietly(handle)  # flushing a full disk fails again; the file goes either way
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise WriteFailed(f"cannot write {path}: {errno.errorcode[exc.errno]} ({os.strerror(exc.errno)}); "
                              "nothing partial was left under that name") from None
        raise


def _close_quietly(handle: BinaryIO) -> None:
    try:
        handle.close()
    except OSError:
        pass



def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class ArtifactError(ValueError):
    """A file the pipeline wrote (manifest, meta, metrics) cannot be read; the message names it."""


def read_json(path: str | Path) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                            "the file is damaged: restore it or redo the stage that wrote it") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not a text JSON file (undecodable bytes)") from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """`read_json` of a file that must hold an object (metrics.json, wall_time.json, stage.json): one holding
    a list or a number is damaged too, and said so rather than failing on its first key."""
    found = read_json(path)
    if not isinstance(found, dict):
        raise ArtifactError(f"{path}: holds a JSON {type(found).__name__}, not an object; the file is damaged: "
                            "restore it or redo the stage that wrote it")
    return found


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
