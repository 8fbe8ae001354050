"""Preview grids and the albumentations adapters."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from augment import build_eval_transform, build_policy
from augment.albu import AugmentOp, PolicyTransform
from augment.preview import GAP_VALUE, make_preview_grid, save_preview_grid

RNG = np.random.default_rng(5)
IMAGES = [RNG.integers(0, 256, (28, 28)).astype(np.uint8), RNG.integers(0, 256, (40, 30, 3)).astype(np.uint8)]


def test_grid_layout_eval_column_and_reproducibility() -> None:
    policy = build_policy("s4", size=32)
    grid = make_preview_grid(IMAGES, policy, draws=3, seed=7, gap=2, min_tile=64)
    tile = 64  # 32 enlarged x2
    assert grid.dtype == np.uint8 and grid.shape == (2 * tile + 3 * 2, 4 * tile + 5 * 2, 3)
    assert (grid[:2] == GAP_VALUE).all() and (grid[:, :2] == GAP_VALUE).all()
    eval_view = build_eval_transform(32)(IMAGES[1])
    first_tile = grid[2 + tile + 2 : 2 + 2 * tile + 2, 2 : 2 + tile]
    assert np.array_equal(first_tile[::2, ::2], eval_view)  # row 1, column 0 = eval view
    gray_tile = grid[2 : 2 + tile, 2 : 2 + tile]
    assert (gray_tile[..., 0] == gray_tile[..., 1]).all()  # grayscale shown as RGB
    assert np.array_equal(grid, make_preview_grid(IMAGES, policy, draws=3, seed=7))
    assert not np.array_equal(grid, make_preview_grid(IMAGES, policy, draws=3, seed=8))


def test_grid_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make_preview_grid([], build_policy("s1"), draws=2, seed=0)
    with pytest.raises(ValueError):
        make_preview_grid(IMAGES, build_policy("s1"), draws=-1, seed=0)
    with pytest.raises(ValueError):
        make_preview_grid(IMAGES, lambda image, seed=None: image, draws=1, seed=0)


def test_save_is_atomic_png(tmp_path: Path) -> None:
    grid = make_preview_grid(IMAGES, build_policy("s2", size=16), draws=2, seed=0)
    target = save_preview_grid(grid, tmp_path / "sub" / "grid.png")
    assert target == tmp_path / "sub" / "grid.png"
    assert np.array_equal(np.asarray(Image.open(target)), grid)
    assert sorted(p.name for p in target.parent.iterdir()) == ["grid.png"]  # no temp file left
    with pytest.raises(ValueError):
        save_preview_grid(grid[..., 0], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_albumentations_adapters() -> None:
    image = IMAGES[1]
    pipeline = A.Compose([AugmentOp("Posterize", 4, p=1.0), AugmentOp("Invert", p=1.0)], seed=1)
    assert np.array_equal(pipeline(image=image)["image"], 255 - (image & 0xF0))
    with pytest.raises(ValueError):
        AugmentOp("Blur")
    first = A.Compose([PolicyTransform("s4-n2-m10", size=32)], seed=3)(image=image)["image"]
    second = A.Compose([PolicyTransform("s4-n2-m10", size=32)], seed=3)(image=image)["image"]
    assert first.shape == (32, 32, 3) and np.array_equal(first, second)


@pytest.mark.parametrize("flag, message", [
    (["--size", "0"], "argument --size: must be >= 1, got 0"),
    (["--draws", "-1"], "argument --draws: must be >= 1, got -1"),
    (["--seed", "-3"], "argument --seed: must be >= 0, got -3"),
    (["--images", "0"], "argument --images: must be >= 1, got 0"),  # rendered the whole split before
])
def test_preview_numbers_out_of_range_name_the_flag(tmp_path, capsys, flag, message):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["augment", "preview", "--policy", "s4", "--data", str(tmp_path), "--out", str(tmp_path / "g.png"), *flag])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
