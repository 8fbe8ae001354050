"""A fast reader of plain (USTAR/GNU/PAX) tar streams: (member name, bytes) in order.

Python's `tarfile` in stream mode costs about 40 µs a member, as much as
decoding a small PNG; parsing the 512-byte headers directly costs about 4 µs.
Compressed shards (gzip, bzip2, xz) are decompressed by the standard library's
readers, which raise on a missing end-of-stream, and parsed the same way.
Damage (a short header or payload, a bad header checksum, no end-of-archive
block, a cut or corrupt compressed stream) raises `TarDamaged`, after every
complete member before it: `tarfile` takes a stream that stops between two
members for a whole archive, and a partial copy often stops exactly there.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")


class TarDamaged(Exception):
    """The tar stream ends early or holds a corrupt header."""


class StreamReadError(OSError):
    """Reading the stream itself failed (an I/O or network error, a failed `pipe:` command): the storage's
    fault, not damage in the shard, so it is never counted as a truncated shard (a rerun reads it again)."""


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    if text[:1] and text[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    return int(text or b"0", 8)


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return _name(kv[5:])
    return None


def _name(raw: bytes) -> str:
    """A member name as `tarfile` decodes it: UTF-8, undecodable bytes kept as surrogates (not an error)."""
    return raw.decode("utf-8", "surrogateescape")


def _read_exact(handle: BinaryIO, size: int, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise TarDamaged(f"stream ends inside {what} ({len(data)} of {size} bytes)")
    return data


def _is_header(block: bytes) -> bool:
    """A block that passes tar's header checksum (and names something)."""
    if len(block) != BLOCK or not block[0]:
        return False
    try:
        return _octal(block[148:156]) == sum(block[:148]) + 256 + sum(block[156:])
    except ValueError:
        return False


def _check_no_member_follows(handle: BinaryIO) -> None:
    """Tar's end-of-archive is a zero block: a member header after it means a run of zeros inside the archive
    (a damaged block, a sparse copy) was read as its end, and the members after it would be lost silently; so
    would those of a second archive appended to the first. Other bytes there are not members (zero padding, the
    file index pixz appends) and are read past, as tar does."""
    rest = b""
    while chunk := handle.read(1 << 16):
        data = rest + chunk
        whole = len(data) - len(data) % BLOCK  # blocks stay aligned whatever a stream's reads return
        data, rest = data[:whole], data[whole:]
        if data.count(0) == len(data):
            continue
        if any(_is_header(data[start:start + BLOCK]) for start in range(0, whole, BLOCK)):
            raise TarDamaged("a member header follows a zero block read as tar's end-of-archive (zeroed bytes "
                             "inside the archive, or a second archive appended): the members after it cannot be "
                             "read")


def _plain_members(handle: BinaryIO) -> Iterator[tuple[str, bytes]]:
    next_name: str | None = None
    while True:
        header = handle.read(BLOCK)
        if header == b"\0" * BLOCK:
            _check_no_member_follows(handle)
            return  # end of archive
        if not header:
            raise TarDamaged("stream ends without tar's end-of-archive block (a partial copy?)")
        if len(header) != BLOCK:
            raise TarDamaged(f"stream ends inside a header ({len(header)} of {BLOCK} bytes)")
        checksum = sum(header[:148]) + 256 + sum(header[156:])
        try:
            stored, size = _octal(header[148:156]), _octal(header[124:136])
        except ValueError:
            raise TarDamaged("a header has a malformed number field") from None
        if stored != checksum:
            raise TarDamaged("a header's checksum does not match (corrupt data)")
        kind = header[156:157]
        data = _read_exact(handle, size, "a member")
        _read_exact(handle, -size % BLOCK, "padding")
        if kind == b"L":  # GNU long name for the next member
            next_name = _name(data.rstrip(b"\0"))
        elif kind == b"x":  # PAX extended header for the next member
            next_name = _pax_path(data) or next_name
        elif kind in REGULAR:
            name = next_name
            if name is None:
                prefix = _name(header[345:500].rstrip(b"\0"))
                base = _name(header[:100].rstrip(b"\0"))
                name = f"{prefix}/{base}" if prefix else base
            next_name = None
            yield name, data
        else:
            next_name = None  # directories, links, global headers: nothing to read


class _Prefixed:
    """A stream whose first bytes were already read (to tell its compression), given back first."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head, self._stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._raw_read(size)
        if size < 0:
            data, self._head = self._head + self._raw_read(-1), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        return data + self._raw_read(size - len(data)) if len(data) < size else data

    def _raw_read(self, size: int) -> bytes:
        """The underlying read, its OSError marked (a decompressor's own OSError, bzip2's "Invalid data
        stream" or gzip's BadGzipFile, is damage)."""
        try:
            return self._stream.read(size)
        except OSError as exc:
            raise StreamReadError(f"{type(exc).__name__}: {exc}") from exc


GZIP, BZIP2, XZ = b"\x1f\x8b", re.compile(rb"BZh[1-9]1AY&SY"), b"\xfd7zXZ\x00"  # bzip2: + first block's magic
HEAD_BYTES = 10  # enough for each (a plain tar starts with its first member's name, which may read "BZh...")
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _decompressed(head: bytes, stream: BinaryIO) -> BinaryIO | None:
    """A decompressing reader when `head` is a gzip, bzip2 or xz magic number, else None."""
    if head.startswith(GZIP):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[arg-type]
    if BZIP2.match(head):
        return bz2.BZ2File(stream)  # type: ignore[return-value]
    if head.startswith(XZ):
        return lzma.LZMAFile(stream)  # type: ignore[return-value]
    return None


def iter_stream_members(handle: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Regular members of an open tar stream, plain or compressed (told by its first bytes), in order."""
    head = handle.read(HEAD_BYTES)
    stream = _Prefixed(head, handle)
    decompressed = _decompressed(head, stream)  # type: ignore[arg-type]
    if decompressed is None:
        yield from _plain_members(stream)  # type: ignore[arg-type]
        return
    try:
        yield from _plain_members(decompressed)
        while decompressed.read(1 << 20):  # to the end marker: a stream cut after the tar's end block is cut too
            pass
    except StreamReadError:
        raise
    except DECOMPRESSION_ERRORS as exc:
        raise TarDamaged(f"the compressed stream is cut or corrupt ({type(exc).__name__}: {exc})") from exc


def iter_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Regular members of the tar at `path`, in stream order."""
    with open(path, "rb", buffering=1 << 20) as handle:
        yield from iter_stream_members(handle)
