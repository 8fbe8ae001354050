"""Hardware set-up from `RuntimeConfig`: accelerator, threads, memory format, precision."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration

from pipeline.config.sections import DIST_TIMEOUT_MINUTES, PEER_TIMEOUT_S, RuntimeConfig
from pipeline.engine.peer_watch import watch_peers


def mixed_precision(runtime: RuntimeConfig) -> str:
    """"auto": bf16 on a GPU that supports it, fp16 on an older GPU, none on CPU.

    Not bf16 on CPU, even where it is native (AVX512-BF16/AMX): it makes resnet18 only 10-46 %
    faster and depthwise nets twice as slow (bench/bench_train_step.py), and with torch 2.14.1
    oneDNN's bf16 weight gradient of a 3x3 convolution on a 1x1 feature map can come back as
    garbage, ~1e15 and up (bench/check_cpu_bf16.py; README, Benchmarks)."""
    if runtime.mixed_precision != "auto":
        return runtime.mixed_precision
    if not torch.cuda.is_available():
        return "no"
    # not emulated bf16: torch's default also says yes on pre-Ampere cards (V100, T4) without bf16 tensor cores
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def use_channels_last(runtime: RuntimeConfig) -> bool:
    """"auto" means on: it is what makes conv nets fast on CPU (measured in the README)."""
    return runtime.channels_last != "off"


def configure_threads(runtime: RuntimeConfig) -> None:
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)


def make_accelerator(runtime: RuntimeConfig, logs_dir: Path, stage: str, hparams: dict) -> Accelerator:
    """One accelerator per training stage, so checkpointed objects never mix across stages."""
    accelerator = Accelerator(
        mixed_precision=mixed_precision(runtime),
        cpu=not torch.cuda.is_available(),
        **({"dynamo_backend": runtime.compile.upper()} if runtime.compile != "no" else {}),
        log_with=runtime.log_with,
        project_config=ProjectConfiguration(project_dir=str(logs_dir), logging_dir=str(logs_dir)),
    )
    if runtime.log_with:
        accelerator.init_trackers(stage, config=hparams)
    return accelerator


def loader_workers(runtime: RuntimeConfig) -> int:
    return min(runtime.workers, os.cpu_count() or 1)


def process_state(timeout_minutes: int = DIST_TIMEOUT_MINUTES, peer_timeout_s: int = PEER_TIMEOUT_S) -> PartialState:
    """Rank/world info; `cpu=True` without a GPU so torchrun/accelerate launch use gloo on CPU. The process
    group's timeout must outlast the longest stage one process runs while the others wait (an import, a
    selection, the export): torch's 30 minutes stopped a large import under torchrun, and its rerun started over.
    A peer that dies is noticed within `peer_timeout_s` instead (pipeline/engine/peer_watch.py)."""
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(minutes=timeout_minutes))
    if state.num_processes > 1:
        watch_peers(state.process_index, state.num_processes, peer_timeout_s)
    return state
