"""Device, autocast and synchronisation for the benches: the same script measures CPU or GPU.

`--device cuda --precision bf16` is what the pipeline does on a GPU (accelerate's autocast,
`runtime.mixed_precision: auto`); timings call `sync` so queued GPU work is inside the window.
"""

from __future__ import annotations

import argparse
import contextlib

import torch


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no",
                        help="autocast dtype (GPU; the pipeline's auto is bf16 where supported; the training "
                             "bench runs fp16 without a loss scaler: a speed figure only)")


def device_of(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is visible to torch")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
