"""Shared fixtures: tiny Fashion-MNIST-like idx files and imported data made on the fly."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


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


@pytest.fixture(scope="session")
def tiny_fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw idx .gz files in the Fashion-MNIST layout: 600 train, 200 test, 10 classes, 28x28."""
    root = tmp_path_factory.mktemp("fm_raw")
    train_y = np.repeat(np.arange(10), 60)
    test_y = np.repeat(np.arange(10), 20)
    write_idx(root / "train-images-idx3-ubyte.gz", synthetic_images(train_y, 28, 1))
    write_idx(root / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(root / "t10k-images-idx3-ubyte.gz", synthetic_images(test_y, 28, 2))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", test_y)
    return root


@pytest.fixture(scope="session")
def tiny_data(tiny_fashion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.data.importer import import_fashion_mnist

    out = tmp_path_factory.mktemp("fm_data")
    import_fashion_mnist(out, source=str(tiny_fashion_dir), per_class=20, seed=0, shard_size=100, progress=False)
    return out


TINY_TEACHER = ["teacher.model.arch=test_resnet", "teacher.model.input_size=16", "teacher.train.epochs=4",
                "teacher.train.batch_size=32", "teacher.train.lr=0.05", "teacher.train.save_every_steps=5",
                "teacher.train.warmup_epochs=1", "runtime.workers=0", "runtime.progress=false"]


def tiny_config(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(f"seed: 0\ndata:\n  source: shards\n  path: {data_dir}\n")
    return path


def set_args(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@pytest.fixture(scope="session")
def tiny_teacher_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, run dir) with the data and teacher stages done on the tiny data."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("teacher_run")
    config = tiny_config(root, tiny_data)
    run = root / "run"
    assert main(["run", str(config), "--run-dir", str(run), "--only", "data"] + set_args(TINY_TEACHER)) == 0
    assert main(["run", str(config), "--run-dir", str(run), "--only", "teacher"] + set_args(TINY_TEACHER)) == 0
    return config, run
