"""The shards a webdataset import has already scanned (`scan.jsonl` in the import directory).

The data stage streams and hashes every shard of every split once; for a pool of thousands of remote
shards that is hours. Each finished shard appends one line (its record, and its labels or skipped
samples), flushed and fsynced, so a kill redoes at most the shard in flight (DESIGN.md §7). A line is
reused only for the same import settings, the same URL and split, and, for a local file, the same size
and modification time; a torn last line is ignored. The file is removed once the manifest is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO

from pipeline.core.atomic import write_text
from pipeline.data.shard_io import ShardLocation

SCAN_JOURNAL = "scan.jsonl"


def _local_stat(location: ShardLocation) -> list[int] | None:
    if not isinstance(location, Path):
        return None  # a stream: nothing to compare without reading it again
    stat = location.stat()
    return [stat.st_size, stat.st_mtime_ns]


class ScanJournal:
    """Read the lines an interrupted scan left (before `claim` removes the file), then `start` a new file
    holding them and `add` a line per shard scanned."""

    def __init__(self, out: Path, params: dict) -> None:
        self.path = out / SCAN_JOURNAL
        self.settings = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        self.entries: dict[tuple[str, str], dict] = {}
        self._handle: IO[str] | None = None
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # the line a kill cut short
                if isinstance(entry, dict) and entry.get("settings") == self.settings:
                    self.entries[(entry.get("split"), entry.get("url"))] = entry

    def _rewrite(self) -> None:
        write_text(self.path, "".join(json.dumps(e) + "\n" for e in self.entries.values()))

    def start(self) -> None:
        self._rewrite()
        self._handle = open(self.path, "a", encoding="utf-8")

    def scanned(self, split: str, url: str, location: ShardLocation) -> dict | None:
        """The entry of a shard scanned before, unchanged since; else None."""
        entry = self.entries.get((split, url))
        return entry if entry is not None and entry.get("stat") == _local_stat(location) else None

    def add(self, split: str, url: str, location: ShardLocation, result: dict) -> None:
        entry = {"settings": self.settings, "split": split, "url": url, "stat": _local_stat(location), **result}
        self.entries[(split, url)] = entry
        if self._handle is not None:
            self._handle.write(json.dumps(entry) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def forget_streams(self) -> None:
        """Keep only local shards' lines (their size and time tell a changed file): after a refusal the user
        rewrites shards, and a stream read again under the same URL may hold other bytes."""
        self.close()
        self.entries = {key: e for key, e in self.entries.items() if e.get("stat") is not None}
        self._rewrite()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> None:
        """The manifest is written: the journal has served."""
        self.close()
        self.path.unlink(missing_ok=True)
