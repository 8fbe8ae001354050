"""Training images/s of a model on CPU: NCHW fp32, channels_last fp32, channels_last bf16 autocast,
and channels_last fp32 with the weight gradients of small maps by shifts (depthwise) and per-tap GEMMs
(dense), what the trainer uses on CPU (`small_map_grad_ratio` is its speed over plain oneDNN).

Prints one JSON line per architecture: images/s of each variant, measured in one run, and the
ratios channels_last/NCHW and bf16/fp32 (bf16 only pays on CPUs with AVX512-BF16 or AMX).
`--compile` adds channels_last fp32 under torch.compile (inductor, what `runtime.compile=inductor`
uses), its ratio to eager and the seconds its warm-up steps took (compilation).
Usage: python bench/bench_train_step.py [--arch resnet18 ...] [--size 32] [--batch 128] [--steps 10] [--compile]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from pipeline.core.allocator import keep_freed_memory
from pipeline.engine.small_map_conv import small_map_weight_grads
from teachers.models import create_model


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX; without them oneDNN emulates bf16, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def train_rate(arch: str, size: int, batch: int, steps: int, channels_last: bool, in_chans: int,
               bf16: bool = False, compile: bool = False, small_map_grad: bool = False,
               optimizer: str = "sgd") -> tuple[float, float]:
    """(images/s after two warm-up steps, seconds the warm-up steps took); `small_map_grad`: weight
    gradients on small maps as the trainer takes them on CPU (pipeline/engine/small_map_conv.py);
    `optimizer`: "sgd" (momentum 0.9) or "adamw", the two the trainer builds."""
    torch.manual_seed(0)
    model = create_model(arch, 10, in_chans)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = (torch.optim.AdamW(model.parameters(), lr=0.001) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    forward = torch.compile(model) if compile else model
    x = torch.randn(batch, in_chans, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    begin = time.perf_counter()
    with small_map_weight_grads(model) if small_map_grad else nullcontext():
        for i in range(steps + 2):
            if i == 2:  # two warm-up steps
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(forward(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start), start - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", nargs="+", default=["resnet18", "mobilenetv3_small_100", "efficientnet_b0"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also channels_last fp32 under torch.compile")
    args = parser.parse_args()
    keep_freed_memory()  # as `selftrain` does (bench_allocator.py measures it)
    for arch in args.arch:
        nchw, _ = train_rate(arch, args.size, args.batch, args.steps, False, args.in_chans)
        nhwc, _ = train_rate(arch, args.size, args.batch, args.steps, True, args.in_chans)
        nhwc_bf16, _ = train_rate(arch, args.size, args.batch, args.steps, True, args.in_chans, bf16=True)
        small_map, _ = train_rate(arch, args.size, args.batch, args.steps, True, args.in_chans,
                                  small_map_grad=True)
        row = {"bench": "train_step", "arch": arch, "size": args.size, "batch": args.batch,
               "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
               "nchw_img_s": round(nchw, 1), "channels_last_img_s": round(nhwc, 1),
               "channels_last_bf16_img_s": round(nhwc_bf16, 1),
               "channels_last_small_map_grad_img_s": round(small_map, 1),
               "channels_last_ratio": round(nhwc / nchw, 3), "bf16_ratio": round(nhwc_bf16 / nhwc, 3),
               "small_map_grad_ratio": round(small_map / nhwc, 3)}
        if args.compile:
            compiled, warmup_s = train_rate(arch, args.size, args.batch, args.steps, True, args.in_chans,
                                            compile=True)
            row.update(channels_last_compiled_img_s=round(compiled, 1), compiled_ratio=round(compiled / nhwc, 3),
                       compile_warmup_s=round(warmup_s, 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
