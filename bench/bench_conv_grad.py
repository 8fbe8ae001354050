"""Weight-gradient time of single convolutions on CPU: oneDNN's (torch's convolution_backward) against
the small-map replacements the trainer uses (pipeline/engine/small_map_conv.py: per-tap GEMMs for
dense convolutions, shifted sums for depthwise ones), and whether the trainer takes the replacement
for that shape on this CPU (its limits follow the vector instructions torch reports, `cpu_capability`).

Prints one JSON line per shape: milliseconds of each (median of --repeats after a warm-up call), their
ratio, and the largest difference relative to the gradient's largest value.
Usage: python bench/bench_conv_grad.py [--batch 384] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from pipeline.engine.small_map_conv import takes_small_map_grad, weight_grad_by_shifts, weight_grad_by_taps
from students.latency import latency_ms

# (in channels, out channels, input side, kernel, stride, groups): the shapes of resnet18 at 32 and
# 64 px (its last stages), a wide one at 224 px, and MobileNetV3-small's depthwise convs at 64 px
SHAPES = [
    (512, 512, 1, 3, 1, 1), (256, 512, 2, 3, 2, 1), (256, 256, 2, 3, 1, 1), (128, 256, 4, 3, 2, 1),
    (128, 128, 4, 3, 1, 1), (64, 64, 8, 3, 1, 1), (512, 512, 2, 3, 1, 1), (256, 256, 4, 3, 1, 1),
    (512, 512, 7, 3, 1, 1), (576, 576, 2, 5, 1, 576), (240, 240, 4, 5, 1, 240), (96, 96, 8, 5, 1, 96),
]


def measure(shape: tuple[int, ...], batch: int, repeats: int) -> dict[str, object]:
    in_ch, out_ch, side, kernel, stride, groups = shape
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
    x = torch.randn(batch, in_ch, side, side).contiguous(memory_format=torch.channels_last)
    weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(conv(x)).contiguous(memory_format=torch.channels_last)
    args = ((kernel, kernel), conv.stride, conv.padding)
    replacement = weight_grad_by_taps if groups == 1 else weight_grad_by_shifts

    def onednn() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(grad, x, weight, None, conv.stride, conv.padding, (1, 1),
                                                   False, (0, 0), groups, (False, True, False))[1]

    onednn_ms = latency_ms(onednn, repeats, warmup=1)
    replacement_ms = latency_ms(lambda: replacement(x, grad, *args), repeats, warmup=1)
    reference = onednn()
    difference = (replacement(x, grad, *args) - reference).abs().max() / reference.abs().max()
    return {"bench": "conv_grad", "in": in_ch, "out": out_ch, "side": side, "kernel": kernel, "stride": stride,
            "depthwise": groups > 1, "batch": batch, "threads": torch.get_num_threads(),
            "onednn_ms": round(onednn_ms, 2), "replacement_ms": round(replacement_ms, 2),
            "ratio": round(onednn_ms / replacement_ms, 2), "trainer_takes_it": takes_small_map_grad(conv, x),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "relative_difference": float(f"{difference:.1e}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=384, help="images per call (384: the demo's student step)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two small shapes, batch 8 (a smoke run)")
    args = parser.parse_args()
    shapes = [(32, 32, 1, 3, 1, 1), (16, 16, 2, 3, 1, 16)] if args.quick else SHAPES
    batch = 8 if args.quick else args.batch
    for shape in shapes:
        print(json.dumps(measure(shape, batch, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
