"""Several processes: each shows it is alive through the launcher's rendezvous store, and stops itself when a
peer has been silent for `runtime.peer_timeout_s`.

Why: gloo (CPU) notices a peer that died inside a collective at once ("Connection closed by peer"), NCCL does
not. A GPU process that was killed, ran out of memory or lost its node left the others waiting in their next
collective until the process group's timeout, `runtime.dist_timeout_minutes` (6 h by default, because a stage
only process 0 runs, a large import, must fit in it), holding their GPUs. A daemon thread per process adds one
to its own counter in the store every few seconds and reads the others' counters; a counter that has not moved
for `peer_timeout_s` (by this process's own clock, so no two clocks are compared) means that process is gone:
this one prints which, on which host, and exits with status 2, which ends its launcher too. A process that was
itself paused (a suspended job resumed one process at a time) restarts the others' clocks instead of blaming them.

A process leaving normally says so first (its `done` key), so a peer slower to finish is not alarmed. The store
itself gone for as long (the launcher or process 0 that held it died) stops the process the same way. A process
stopped with SIGSTOP (Ctrl-Z) for longer than the timeout counts as gone.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist


class PeerWatch:
    """The heartbeat and watch thread of one process (`start` once the process group exists, `close` at the end)."""

    def __init__(self, rank: int, world: int, timeout_s: float, interval_s: float | None = None) -> None:
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.interval_s = interval_s if interval_s is not None else max(1.0, min(10.0, self.timeout_s / 10))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # the store outlives a restarted worker group
        self.prefix = f"selftrain/peer-watch/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}"
        # a client of its own: the process group's store connection is not shared with a second thread
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=max(5.0, self.interval_s * 3)), wait_for_workers=False)
        self.store.set(self._key("host", rank), socket.gethostname())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="selftrain peer watch", daemon=True)

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}/{kind}/{rank}"

    def start(self) -> "PeerWatch":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop watching and tell the others this process left on purpose."""
        self._stop.set()
        self._thread.join()
        try:
            self.store.set(self._key("done", self.rank), "1")
        except Exception:  # noqa: BLE001 - the store may already be gone at the very end
            pass

    def _watch(self) -> None:
        silence = Silence([r for r in range(self.world) if r != self.rank], self.timeout_s,
                          max(3 * self.interval_s, self.timeout_s / 2), time.monotonic())
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            silence.tick(now)
            try:
                self.store.add(self._key("beat", self.rank), 1)
                live = [r for r in silence.ranks if not self.store.check([self._key("done", r)])]
                gone = silence.observe(now, {r: int(self.store.add(self._key("beat", r), 0)) for r in live})
                if gone is not None:
                    rank, seconds = gone
                    self._stop_process(f"process {rank} (on {self._host(rank)}) has given no sign of life for "
                                       f"{seconds:.0f} s (runtime.peer_timeout_s: {self.timeout_s:g}); it failed, was "
                                       "killed or lost its node: its own log says why")
            except Exception as exc:  # noqa: BLE001 - the store's errors vary by version
                if self._stop.is_set():
                    return
                if now - silence.store_ok > self.timeout_s:
                    self._stop_process(f"the launcher's rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                                       f"{os.environ.get('MASTER_PORT')} has not answered for "
                                       f"{now - silence.store_ok:.0f} s ({type(exc).__name__}); the node holding it "
                                       "(process 0's) stopped")

    def _host(self, rank: int) -> str:
        try:
            return self.store.get(self._key("host", rank)).decode()
        except Exception:  # noqa: BLE001
            return "an unknown host"

    def _stop_process(self, why: str) -> None:
        if self._stop.is_set():  # closing: this process is leaving anyway
            return
        print(f"selftrain: error: {why}; stopping process {self.rank} (on {socket.gethostname()})",
              file=sys.stderr, flush=True)
        os._exit(2)


class Silence:
    """How long each other process's beat counter has stood still, by this process's own clock. A gap of more
    than `own_gap_s` between this process's own ticks means it was itself stopped or starved (a whole job
    suspended and resumed one process at a time): the others' silence covers its own pause, so their clocks
    restart instead of being blamed."""

    def __init__(self, ranks: list[int], timeout_s: float, own_gap_s: float, now: float) -> None:
        self.ranks, self.timeout_s, self.own_gap_s = ranks, timeout_s, own_gap_s
        self.seen: dict[int, tuple[int, float]] = {r: (-1, now) for r in ranks}
        self.last = self.store_ok = now

    def tick(self, now: float) -> None:
        if now - self.last > self.own_gap_s:
            self.seen = {r: (beats, now) for r, (beats, _) in self.seen.items()}
            self.store_ok = now
        self.last = now

    def observe(self, now: float, beats: dict[int, int]) -> tuple[int, float] | None:
        """The first process silent for longer than the timeout, with its seconds of silence (None: all alive);
        `beats` holds the counters of the processes still running (one that left on purpose is not there)."""
        self.store_ok = now
        for rank, count in beats.items():
            if count != self.seen[rank][0]:
                self.seen[rank] = (count, now)
            elif now - self.seen[rank][1] > self.timeout_s:
                return rank, now - self.seen[rank][1]
        return None


_watch: PeerWatch | None = None
_started = False


def watch_peers(rank: int, world: int, timeout_s: float) -> None:
    """Start this process's watch, once per process (not again after `stop_watching_peers`: the process group is
    gone by then); several processes launched through torchrun / accelerate launch only."""
    global _watch, _started
    if not _started and world > 1 and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        _started = True
        _watch = PeerWatch(rank, world, timeout_s).start()


def stop_watching_peers() -> None:
    global _watch
    if _watch is not None:
        _watch.close()
        _watch = None
