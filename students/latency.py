"""Latency of a model: median wall time of repeated calls, batch 1 and a larger batch.

Same threads for every runtime: ONNX sessions use their own intra-op setting, PyTorch the global
`torch.get_num_threads()`.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

# --------------------------------------------------------------------------------------------
# Latency and size
# --------------------------------------------------------------------------------------------


def latency_ms(run_batch: Callable[[], object], repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of `run_batch()` in milliseconds over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        run_batch()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run_batch()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def _latency_result(batch1_ms: float, batch: int, batch_ms: float, threads: int) -> dict[str, float]:
    return {
        "batch1_ms": batch1_ms,
        f"batch{batch}_ms": batch_ms,
        f"batch{batch}_img_s": batch * 1000.0 / batch_ms,
        "threads": threads,
    }


def onnx_latency(
    session: ort.InferenceSession, input_shape: tuple[int, int, int], batch: int = 64, repeats: int = 30
) -> dict[str, float]:
    """Median batch-1 latency (ms) and batch-`batch` throughput (images/s) of an ONNX session."""
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, *input_shape), dtype=np.float32)
    many = rng.standard_normal((batch, *input_shape), dtype=np.float32)
    threads = session.get_session_options().intra_op_num_threads
    return _latency_result(
        latency_ms(lambda: session.run(None, {name: one}), repeats),
        batch,
        latency_ms(lambda: session.run(None, {name: many}), repeats),
        threads,
    )


def interleaved_onnx_samples(
    sessions: dict[str, ort.InferenceSession], input_shape: tuple[int, int, int], batch: int = 64,
    repeats: int = 30, rounds: int = 3,
) -> dict[str, list[dict[str, float]]]:
    """:func:`onnx_latency` of each session in each of `rounds` interleaved rounds (a, b, ..., a, b, ...),
    so that load from other processes hits every model alike; one result per round and session."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in sessions}
    for _ in range(max(1, rounds)):
        for name, session in sessions.items():
            samples[name].append(onnx_latency(session, input_shape, batch, repeats))
    return samples


def interleaved_onnx_latency(
    sessions: dict[str, ort.InferenceSession], input_shape: tuple[int, int, int], batch: int = 64,
    repeats: int = 30, rounds: int = 3,
) -> dict[str, dict[str, float]]:
    """:func:`interleaved_onnx_samples` reduced by the median over the rounds."""
    return median_over_rounds(interleaved_onnx_samples(sessions, input_shape, batch, repeats, rounds), batch)


def median_over_rounds(samples: dict[str, list[dict[str, float]]], batch: int = 64) -> dict[str, dict[str, float]]:
    """Per session, the median batch-1 latency and batch-`batch` throughput over its rounds."""
    key = f"batch{batch}_img_s"
    return {name: {"batch1_ms": float(statistics.median(x["batch1_ms"] for x in runs)),
                   key: float(statistics.median(x[key] for x in runs))}
            for name, runs in samples.items()}


def torch_latency(
    model: torch.nn.Module,
    input_shape: tuple[int, int, int],
    batch: int = 64,
    repeats: int = 30,
    channels_last: bool = True,
) -> dict[str, float]:
    """Like :func:`onnx_latency` for PyTorch (a CPU copy in eval mode, inference_mode, global threads), in fp32:
    a model accelerate prepared for mixed precision carries an autocast `forward` on the instance, which the
    copy drops (pruning's "after" was timed in bf16 against an fp32 "before")."""
    model = copy.deepcopy(model).cpu().eval()
    model.__dict__.pop("forward", None)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    one = torch.randn(1, *input_shape).contiguous(memory_format=memory_format)
    many = torch.randn(batch, *input_shape).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        return _latency_result(
            latency_ms(lambda: model(one), repeats), batch, latency_ms(lambda: model(many), repeats),
            torch.get_num_threads(),
        )


def interleaved_torch_latency(
    models: dict[str, torch.nn.Module], input_shape: tuple[int, int, int], batch: int = 64, repeats: int = 30,
    rounds: int = 3, channels_last: bool = True,
) -> dict[str, dict[str, float]]:
    """:func:`torch_latency` of each model in `rounds` interleaved rounds, reduced by the median over the
    rounds: two models timed minutes apart (before and after pruning) can meet different loads; timed
    alternately, both meet the same."""
    per_round = max(1, -(-repeats // rounds))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(max(1, rounds)):
        for name, model in models.items():
            samples[name].append(torch_latency(model, input_shape, batch, per_round, channels_last))
    return median_over_rounds(samples, batch)
