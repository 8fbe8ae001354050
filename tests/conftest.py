"""Shared fixtures: tiny Fashion-MNIST-like idx files and imported data made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.core.allocator import keep_freed_memory
from pipeline.data.sources.synthetic import synthetic_images, write_fashion_like  # noqa: F401 (re-exported)

# under pytest-xdist (`make test` runs two workers on two cores) each worker gets one thread
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
keep_freed_memory()  # as `selftrain` does; tests/test_allocator.py checks it in fresh processes


@pytest.fixture(scope="session")
def tiny_fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw idx .gz files in the Fashion-MNIST layout: 600 train, 200 test, 10 classes, 28x28."""
    return write_fashion_like(tmp_path_factory.mktemp("fm_raw"), train_per_class=60, test_per_class=20)


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


def record_as_made_before(stage_dir: Path, edit) -> None:
    """Rewrite RUN/<stage>/stage.json as an earlier version recorded it: `edit(inputs)` changes the recorded
    inputs in place, the fingerprint is recomputed from them."""
    import json

    from pipeline.config.loading import fingerprint
    path = stage_dir / "stage.json"
    inputs = json.loads(path.read_text())["inputs"]
    edit(inputs)
    path.write_text(json.dumps({"fingerprint": fingerprint(inputs), "inputs": inputs}))
