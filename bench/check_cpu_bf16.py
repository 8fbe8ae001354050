"""Does bf16 autocast on this CPU give sane weight gradients? Run before switching CPU training to bf16.

Trains a random resnet18 on random batches with SGD, in fp32 and in bf16 autocast (channels_last,
one thread), and reports the first step at which any weight gradient exceeds --limit. With
torch 2.14.1 on AVX512-BF16 (AMD EPYC), bf16 at 16 px (1x1 feature maps in layer4) returns
garbage gradients (~1e15 and up) within a few steps, while fp32 stays below 1; this is why
`runtime.mixed_precision: auto` keeps CPU training in fp32. Prints one JSON line per size.
Usage: python bench/check_cpu_bf16.py [--sizes 16 32 40] [--batch 48] [--steps 30]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from teachers.models import create_model


def first_bad_step(size: int, batch: int, steps: int, bf16: bool, limit: float) -> tuple[int | None, str | None]:
    """The first step whose largest weight gradient exceeds `limit`, and that parameter's name."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, param in model.named_parameters():
            if not torch.isfinite(param.grad).all() or param.grad.abs().max().item() > limit:
                return step, name
        optimizer.step()
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 40])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--limit", type=float, default=1e3, help="a gradient above this is garbage")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for size in args.sizes:
        row = {"check": "cpu_bf16_grads", "size": size, "batch": args.batch, "steps": args.steps}
        for precision in ("fp32", "bf16"):
            step, name = first_bad_step(size, args.batch, args.steps, precision == "bf16", args.limit)
            row[f"{precision}_first_bad_step"] = step
            row[f"{precision}_bad_param"] = name
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
