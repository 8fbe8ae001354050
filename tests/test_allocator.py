"""`keep_freed_memory()`: a training-step-like pattern of allocations stops page-faulting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.core.allocator import OPT_OUT_ENV, on_glibc

glibc_only = pytest.mark.skipif(not on_glibc(), reason="the thresholds are glibc's")

# Eight 16 MiB buffers written and freed together, like one step's activations; the page faults
# of five steps after two warm-up steps. 5 x 8 x 16 MiB are 40,960 pages of 4 KiB.
STEPS_PAGES = 5 * 8 * (16 << 20) // 4096
CHILD = textwrap.dedent("""
    import ctypes, resource
    from pipeline.core.allocator import keep_freed_memory

    applied = keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20

    def step():
        buffers = [libc.malloc(size) for _ in range(8)]
        for buffer in buffers:
            ctypes.memset(buffer, 1, size)
        for buffer in buffers:
            libc.free(buffer)

    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults_of_five_steps(keep: str) -> tuple[str, int]:
    env = dict(os.environ, **{OPT_OUT_ENV: keep})
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@glibc_only
def test_freed_step_memory_is_reused_without_page_faults() -> None:
    applied, faults = faults_of_five_steps("1")
    assert applied == "True"
    assert faults < STEPS_PAGES // 100, f"{faults} page faults in 5 steps: the freed buffers went back to the OS"


@glibc_only
def test_opting_out_leaves_glibc_to_fault_the_buffers_in_every_step() -> None:
    """The control: the same steps under glibc's defaults fault in nearly every page again."""
    applied, faults = faults_of_five_steps("0")
    assert applied == "False"
    assert faults > STEPS_PAGES // 2


def test_the_command_line_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.cli

    calls = []
    monkeypatch.setattr(pipeline.cli, "keep_freed_memory", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):
        pipeline.cli.main(["--version"])
    assert calls == []  # argparse exits before any work
    assert pipeline.cli.main(["status", "/nonexistent-run-dir"]) == 2
    assert calls == [True]
