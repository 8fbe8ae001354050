"""Training images/s of a model with and without channels_last, measured in one run.

Prints one JSON line per architecture: images/s in each memory format and their ratio.
Usage: python bench/bench_channels_last.py [--arch resnet18 ...] [--size 32] [--batch 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from teachers.models import create_model


def train_rate(arch: str, size: int, batch: int, steps: int, channels_last: bool, in_chans: int) -> float:
    torch.manual_seed(0)
    model = create_model(arch, 10, in_chans)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, in_chans, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", nargs="+", default=["resnet18", "mobilenetv3_small_100", "efficientnet_b0"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--in-chans", type=int, default=1)
    args = parser.parse_args()
    for arch in args.arch:
        nchw = train_rate(arch, args.size, args.batch, args.steps, False, args.in_chans)
        nhwc = train_rate(arch, args.size, args.batch, args.steps, True, args.in_chans)
        print(json.dumps({"bench": "channels_last", "arch": arch, "size": args.size, "batch": args.batch,
                          "threads": torch.get_num_threads(), "nchw_img_s": round(nchw, 1),
                          "channels_last_img_s": round(nhwc, 1), "ratio": round(nhwc / nchw, 3)}), flush=True)


if __name__ == "__main__":
    main()
