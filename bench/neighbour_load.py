"""CPU used by other processes while a benchmark round runs (shared by the bench scripts)."""

from __future__ import annotations

import time

import psutil


class NeighbourLoad:
    """CPU used by other processes on this machine (and hypervisor steal) while measuring, in cores.

    Busy CPU time of the whole machine minus this process and its reaped children (DataLoader
    workers are joined when their iterator is deleted, before `cores()` is read). Near 0 on a
    quiet machine; on a shared 2-core machine anything above ~0.2 means that round is disturbed.
    """

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        cpu = psutil.cpu_times()
        busy = sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0) - getattr(cpu, "guest", 0.0) \
            - getattr(cpu, "guest_nice", 0.0)
        own = sum(self.me.cpu_times()[:4])  # user, system, children_user, children_system
        return time.perf_counter(), busy, own

    def cores(self) -> float:
        wall, busy, own = self._read()
        return max(0.0, ((busy - self.start[1]) - (own - self.start[2])) / max(1e-9, wall - self.start[0]))
