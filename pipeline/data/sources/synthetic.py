"""Tiny Fashion-MNIST-like raw files made on the fly (tests, the crash-matrix bench): no download, learnable.

Class c is a bright bar at a c-dependent row over low noise; the files use the idx .gz layout that
`pipeline.data.sources.fashion_mnist` reads.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def synthetic_images(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Learnable class-dependent patterns plus noise: class c is a bar at a c-dependent place."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(len(labels), size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        row = 2 + (int(c) * (size - 6)) // 9
        images[i, row:row + 3, 3:size - 3] = 220
    return images


def write_fashion_like(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """The four idx .gz files of a 10-class, 28x28 set under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    train_y = np.repeat(np.arange(10), train_per_class)
    test_y = np.repeat(np.arange(10), test_per_class)
    write_idx(root / "train-images-idx3-ubyte.gz", synthetic_images(train_y, 28, 1))
    write_idx(root / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(root / "t10k-images-idx3-ubyte.gz", synthetic_images(test_y, 28, 2))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", test_y)
    return root
