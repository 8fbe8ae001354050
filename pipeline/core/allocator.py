"""Keep freed tensor memory inside the process (glibc's malloc), so training steps stop page-faulting.

glibc serves each block above its mmap threshold (128 KiB at first, adapting up to 32 MiB) with a
fresh `mmap` and returns the top of its heap to the OS once 128 KiB there are free. A CPU training
step allocates and frees the same activation buffers every time, so every step faults all of that
memory in again and the kernel zeroes it page by page. Fixing both thresholds keeps the buffers in the
heap: 100 steps of the demo's ShuffleNet distillation page-fault 0.75 instead of 3.0-3.3 million times,
and `make demo` took 29 min 03 s instead of 31 min 25 s on a 2-core AVX2 CPU with identical results.
Per training step the gain is 1.0-1.3x and noisy on that shared machine (`bench/bench_allocator.py`,
README "Benchmarks"); blocks over the 32 MiB cap (resnet18's first activations at batch 384) are still
mapped fresh. jemalloc (LD_PRELOAD, default options) was slower than both there.
The price: the process keeps its peak heap until it exits instead of shrinking between stages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

OPT_OUT_ENV = "SELFTRAIN_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults (what the bench compares against)

# mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 2**20
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top is kept before any trim


def on_glibc() -> bool:
    """Linux with glibc: the only C library whose thresholds this module sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (inherited by forked loader workers).

    Returns True when they were set; False off glibc (macOS, musl), when OPT_OUT_ENV is "0", or
    when mallopt refuses. Safe to call more than once."""
    if os.environ.get(OPT_OUT_ENV, "1") == "0" or not on_glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    return bool(mmap_set and trim_set)
