"""Preview grids: what a policy does to a few images, before a day of GPU time is spent on it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from augment.policies import build_eval_transform

GAP_VALUE = 255  # white gaps: the policies pad with black, so padding stays visible
# a PNG text chunk every saved grid carries: `selftrain augment preview --out` replaces only a file that has it
MARK_KEY, MARK_VALUE = "Software", "selftrain augment preview"


def _rgb(tile: np.ndarray) -> np.ndarray:
    return np.repeat(tile, 3, axis=2) if tile.shape[2] == 1 else tile


def make_preview_grid(
    images: Sequence[np.ndarray],
    policy: Callable[..., np.ndarray],
    draws: int,
    seed: int,
    *,
    gap: int = 2,
    min_tile: int = 64,
) -> np.ndarray:
    """Rows = images; column 0 = the eval view, then ``draws`` augmented draws.

    ``policy`` is a built policy (it must have ``size``). Draw (row i, column j) uses seed
    ``(seed, i, j)``, so a grid is reproducible. Tiles are enlarged by an integer factor
    (nearest neighbour) to at least ``min_tile`` pixels so 32x32 images stay visible.
    Returns a uint8 HxWx3 RGB array.
    """
    if not images:
        raise ValueError("make_preview_grid needs at least one image")
    if draws < 0 or gap < 0:
        raise ValueError(f"draws and gap must be >= 0, got draws={draws}, gap={gap}")
    size = getattr(policy, "size", None)
    if not isinstance(size, int):
        raise ValueError("policy must be a built policy with an integer `size` (see build_policy)")
    eval_view = build_eval_transform(size)
    scale = max(1, -(-min_tile // size))
    tile = size * scale
    rows, cols = len(images), draws + 1
    grid = np.full((rows * tile + (rows + 1) * gap, cols * tile + (cols + 1) * gap, 3), GAP_VALUE, dtype=np.uint8)
    for i, image in enumerate(images):
        views = [eval_view(image)] + [policy(image, seed=(seed, i, j)) for j in range(draws)]
        for j, view in enumerate(views):
            big = _rgb(view).repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = gap + i * (tile + gap), gap + j * (tile + gap)
            grid[top : top + tile, left : left + tile] = big
    return grid


def save_preview_grid(grid: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write ``grid`` as PNG atomically (temp file in the same folder, then ``os.replace``), marked as ours
    (``is_preview_png``)."""
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
        raise ValueError(f"grid must be a uint8 HxWx3 array, got {grid.dtype} {grid.shape}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            mark = PngImagePlugin.PngInfo()
            mark.add_text(MARK_KEY, MARK_VALUE)
            Image.fromarray(grid).save(handle, format="PNG", pnginfo=mark)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a preview is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def is_preview_png(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PNG that ``save_preview_grid`` wrote (its text chunk MARK_KEY is MARK_VALUE)."""
    try:
        with Image.open(path, formats=["PNG"]) as image:  # the chunks before the pixels; no pixels read
            return image.format == "PNG" and image.info.get(MARK_KEY) == MARK_VALUE
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
