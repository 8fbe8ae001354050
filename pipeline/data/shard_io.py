"""Where a shard's bytes come from: a local file (the fast tar reader) or any URL `webdataset.gopen` opens.

A shard location is a `Path` (a plain path or a `file://` URL) or a URL string (`pipe:CMD`,
`http(s)://`, and whatever else webdataset's gopen handles). Local files keep the fast reader of
`tarstream`; every other stream goes through webdataset's own tar iterator. Either way the
members come out as (name, bytes), in order, for the one sample grouping in `shards.iter_shard`.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen

from pipeline.data.tarstream import StreamReadError, TarDamaged, iter_members, iter_stream_members

ShardLocation = Path | str  # a local file, or a URL for webdataset.gopen
ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")


def as_location(url: str) -> ShardLocation:
    """A plain path or `file://` URL becomes a Path (read by the fast local reader); other URLs stay text."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "":
        return Path(url)
    return url


def shard_basename(location: ShardLocation) -> str:
    """The shard's file name: what sidecars, plans and manifests are keyed by. For `pipe:CMD` it is the
    last argument of the command that names a tar archive (`pipe:cat /d/pool-000001.tar` -> pool-000001.tar)."""
    if isinstance(location, Path):
        return location.name
    if location.startswith("pipe:"):
        try:
            words = shlex.split(location[5:])
        except ValueError:
            words = location[5:].split()
        archives = [w for w in words if any(urlparse(w).path.endswith(s) for s in ARCHIVE_SUFFIXES)]
        return PurePosixPath(urlparse(archives[-1]).path).name if archives else ""
    return PurePosixPath(urlparse(location).path).name


class Fingerprint:
    """sha256 and size of a shard's bytes, taken while the shard is streamed (once)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.size = 0

    def tap(self, stream: BinaryIO) -> "_Tapped":
        return _Tapped(stream, self)

    def update(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


class _Tapped:
    """A read-only stream whose every byte also goes to a Fingerprint."""

    def __init__(self, stream: BinaryIO, fingerprint: Fingerprint):
        self._stream, self._fingerprint = stream, fingerprint

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._fingerprint.update(data)
        return data

    def drain(self) -> None:
        """Read to the end: the bytes after the tar's end-of-archive blocks belong to the shard too."""
        while self.read(1 << 20):
            pass


def _remote_members(url: str, fingerprint: Fingerprint | None) -> Iterator[tuple[str, bytes]]:
    stream = gopen(url, "rb")
    finished = False
    try:
        handle = fingerprint.tap(stream) if fingerprint is not None else stream
        yield from iter_stream_members(handle)  # type: ignore[arg-type]
        if isinstance(handle, _Tapped):
            handle.drain()
        finished = True
    except TarDamaged as damage:  # a command that failed (no such file, no network) ends its stream early
        try:
            stream.close()
        except OSError as failed:
            raise StreamReadError(f"the stream's command failed: {failed} ({damage})") from damage
        raise
    finally:
        try:
            stream.close()  # a pipe: waits for the command; its failure is an error only after a full read
        except OSError:
            if finished:
                raise


def shard_members(location: ShardLocation, fingerprint: Fingerprint | None = None) -> Iterator[tuple[str, bytes]]:
    """Regular members (name, bytes) of one shard, in order; with `fingerprint`, every byte of the
    shard (read to its end) is hashed on the way."""
    if not isinstance(location, Path):
        yield from _remote_members(location, fingerprint)
    elif fingerprint is None:
        yield from iter_members(location)
    else:
        with open(location, "rb", buffering=1 << 20) as raw:
            handle = fingerprint.tap(raw)
            yield from iter_stream_members(handle)  # type: ignore[arg-type]
            handle.drain()
