"""Images/s of the augmentation policies on one CPU core, against torchvision.transforms.v2
doing the same work, measured in the same run.

Prints one JSON line per case (policy x input size): our images/s, torchvision's, and the
ratio ours / torchvision. Inputs: 28x28 grayscale (Fashion-MNIST, real images when the
Debian dataset package is installed) upscaled to 32x32 output, and 224x224 RGB to 224x224.
`rotate` (in the default list): one line per image side for the Rotate op alone at RandAugment's 20
nonzero angles: ours (source pixels from torch's grid, cached, copied by cv2.remap) against
cv2.warpAffine, the kernel it replaced (same matrix; it rounded ties differently from torchvision);
then on 224-px-high images 224-400 px wide, where every (width, angle) misses the map cache.
Usage: python bench/bench_augment.py [--quick] [--seconds 1.0] [--policies s1 s4 eval rotate]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.transforms import v2

from augment import build_eval_transform, build_policy, geometry

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
JITTER = {"s1": (0.8, 1.2), "s2": (0.8, 1.2), "s3": (0.5, 2.0), "s4": (0.5, 2.0)}


def fashion_images(count: int) -> tuple[list[np.ndarray], str]:
    if FASHION_MNIST.exists():
        with gzip.open(FASHION_MNIST, "rb") as handle:
            raw = handle.read(16 + count * 28 * 28)
        pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(count, 28, 28)
        return [pixels[i].copy() for i in range(count)], "fashion-mnist"
    return synthetic_images(count, 28, channels=1), "synthetic"


def synthetic_images(count: int, side: int, channels: int) -> list[np.ndarray]:
    """Smooth random images (low-frequency noise enlarged): natural-looking histograms."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (8, 8, channels)).astype(np.uint8)
        image = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_CUBIC)
        images.append(image if channels == 3 else image.reshape(side, side))
    return images


def torchvision_pipeline(policy: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same work with torchvision v2 on uint8 CHW tensors."""
    if policy == "eval":
        return v2.Compose([v2.Resize(size), v2.CenterCrop(size)])
    steps: list[torch.nn.Module] = [v2.Resize(size)]
    if policy in ("s2", "s3"):
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif policy == "s4":
        steps.append(v2.RandAugment(num_ops=2, magnitude=10, num_magnitude_bins=11))
    steps += [
        v2.RandomHorizontalFlip(0.5),
        v2.ScaleJitter((size, size), scale_range=JITTER[policy]),
        v2.RandomCrop(size, pad_if_needed=True),
    ]
    return v2.Compose(steps)


def rate(fn: Callable[[int], object], seconds: float) -> float:
    """Calls per second of fn(i) over at least ``seconds`` (fn(0), fn(1), ... in order)."""
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            fn(calls)
            calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed


def best_rates(ours: Callable[[int], object], reference: Callable[[int], object], seconds: float) -> tuple[float, float]:
    """Interleaved rounds, best round of each: on a CPU shared with other work this measures
    both sides under the same conditions and discards rounds slowed by the neighbours."""
    ours(0), reference(0)  # warm-up
    rounds = 3
    best_ours = best_reference = 0.0
    for _ in range(rounds):
        best_ours = max(best_ours, rate(ours, seconds / rounds))
        best_reference = max(best_reference, rate(reference, seconds / rounds))
    return best_ours, best_reference


# Rotate at RandAugment's strengths M / 10 of 30 degrees, both signs; 0 left out (rotate(img, 0) returns at once)
POLICY_ANGLES = [3.0 * k for k in range(-10, 11) if k != 0]


def warp_affine_rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """The Rotate kernel before 2026-12-03: cv2.warpAffine, nearest, on torchvision's inverse matrix."""
    height, width = img.shape[:2]
    a, b, c, d, e, f = geometry._torchvision_inverse_matrix((0.0, 0.0), -degrees, (0.0, 0.0), (0.0, 0.0))
    ox, oy = (width - 1) * 0.5, (height - 1) * 0.5
    matrix = np.array([[a, b, c + ox - a * ox - b * oy], [d, e, f + oy - d * ox - e * oy]])
    flags = cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(img, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT)


def bench_rotate_op(seconds: float) -> None:
    for side in (32, 64, 224):
        img = synthetic_images(1, side, 3)[0]
        for angle in POLICY_ANGLES:  # fill the map cache, as the first images of a run do
            geometry.rotate(img, angle)
        ours_rate, reference_rate = best_rates(
            lambda i: geometry.rotate(img, POLICY_ANGLES[i % len(POLICY_ANGLES)]),
            lambda i: warp_affine_rotate(img, POLICY_ANGLES[i % len(POLICY_ANGLES)]),
            seconds,
        )
        print_rotate_row(f"{side}x{side}x3", ours_rate, reference_rate)
    # mixed aspect ratio: every (width, angle) is a new cache key, so each call builds its map
    wide = synthetic_images(1, 400, 3)[0][:224]
    images = [np.ascontiguousarray(wide[:, :width]) for width in range(224, 401)]

    def pick(i: int) -> tuple[np.ndarray, float]:
        return images[i % len(images)], POLICY_ANGLES[i % len(POLICY_ANGLES)]

    ours_rate, reference_rate = best_rates(
        lambda i: geometry.rotate(*pick(i)), lambda i: warp_affine_rotate(*pick(i)), seconds
    )
    print_rotate_row("224xWx3, W 224-400", ours_rate, reference_rate)


def print_rotate_row(input_name: str, ours_rate: float, reference_rate: float) -> None:
    print(json.dumps({
        "bench": "rotate op", "input": input_name, "threads": 1, "ours_us": round(1e6 / ours_rate, 1),
        "warp_affine_us": round(1e6 / reference_rate, 1), "ratio": round(ours_rate / reference_rate, 2),
    }), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["s1", "s2", "s3", "s4", "eval", "rotate"],
                        help="policies to time; `rotate`: the Rotate op alone against cv2.warpAffine")
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement (split in 3 rounds)")
    parser.add_argument("--quick", action="store_true", help="0.6 s per measurement")
    args = parser.parse_args()
    seconds = 0.6 if args.quick else args.seconds
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    small, source = fashion_images(256)
    cases = [("28x28x1", small, 32, source), ("224x224x3", synthetic_images(64, 224, 3), 224, "synthetic")]
    for input_name, images, size, image_source in cases:
        tensors = [torch.from_numpy(img if img.ndim == 3 else img[:, :, None]).permute(2, 0, 1).contiguous()
                   for img in images]
        for policy in [name for name in args.policies if name != "rotate"]:
            ours = build_eval_transform(size) if policy == "eval" else build_policy(policy, size)
            reference = torchvision_pipeline(policy, size)
            torch.manual_seed(0)
            ours_rate, reference_rate = best_rates(
                lambda i: ours(images[i % len(images)], seed=i), lambda i: reference(tensors[i % len(tensors)]), seconds
            )
            print(json.dumps({
                "bench": "augment", "policy": str(getattr(ours, "spec", "eval")), "input": input_name,
                "output": f"{size}x{size}", "images": image_source, "threads": 1,
                "ours_img_s": round(ours_rate, 1), "torchvision_img_s": round(reference_rate, 1),
                "ratio": round(ours_rate / reference_rate, 2),
            }), flush=True)  # fmt: skip
    if "rotate" in args.policies:
        bench_rotate_op(seconds)


if __name__ == "__main__":
    main()
