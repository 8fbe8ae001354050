"""Geometric ops: the affine ops of AutoAugment / RandAugment and the resize / crop / pad / flip
steps every policy ends with.

Images are "working" images: uint8, HxW (grayscale) or HxWx3 (RGB).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import torch
from torch.nn.functional import grid_sample

# Cached source maps: a few bins x signs x ops per image size; 64 entries are 0.5 MB at 32 px and
# 26 MB at 224 x 224 (two float32 maps each). Images of many aspect ratios miss it (the ops run after
# resize_shorter, so the long side varies): S4 at 224 px then runs at 0.63x the warpAffine kernel's speed.
SOURCE_MAP_CACHE_SIZE = 64


def _torchvision_inverse_matrix(
    center: tuple[float, float], angle: float, translate: tuple[float, float], shear: tuple[float, float]
) -> tuple[float, float, float, float, float, float]:
    """torchvision's ``_get_inverse_affine_matrix`` (scale 1): output -> input coordinates,
    both measured from the image centre (pixel index minus (size - 1) / 2)."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m[0], m[1], m[2], m[3], m[4], m[5]


def _base_coordinates(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred pixel coordinates as torchvision's ``_affine_grid`` makes them (float32 linspace)."""
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, dtype=torch.float32)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, dtype=torch.float32)
    return xs, ys


def _rescaled_theta(height: int, width: int, inverse_centered: tuple[float, ...]) -> torch.Tensor:
    """torchvision's 3 x 2 matrix: the inverse matrix, transposed, over half the size (float32)."""
    theta = torch.tensor(inverse_centered, dtype=torch.float32).reshape(1, 2, 3)
    return theta.transpose(1, 2).div_(torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float32))


def _grid_by_bmm(height: int, width: int, inverse_centered: tuple[float, ...]) -> torch.Tensor:
    """The sampling grid by torchvision's own steps (``_affine_grid``, its transposed matrix and bmm
    included): exact by construction, but slow: a map costs 1.2 ms at 224 x 300 px with it, 0.5 ms
    with _grid_by_numpy."""
    xs, ys = _base_coordinates(height, width)
    base_grid = torch.empty(1, height, width, 3, dtype=torch.float32)
    base_grid[..., 0].copy_(xs)
    base_grid[..., 1].copy_(ys.unsqueeze(-1))
    base_grid[..., 2].fill_(1)
    rescaled = _rescaled_theta(height, width, inverse_centered)
    return base_grid.view(1, height * width, 3).bmm(rescaled).view(1, height, width, 2)


def _grid_by_numpy(height: int, width: int, inverse_centered: tuple[float, ...]) -> torch.Tensor:
    """The same grid in numpy float32 as (x * r0 + y * r1) + r2. It gave torch's bmm bit for bit
    on 10 million coordinates here (AVX2 EPYC); whether another CPU's BLAS kernel adds in that
    order (and without a fused multiply-add) is checked once per process (_numpy_grid_matches_bmm)."""
    xs, ys = (t.numpy() for t in _base_coordinates(height, width))
    r = _rescaled_theta(height, width, inverse_centered)[0].numpy()
    x, y = xs[None, :], ys[:, None]
    grid = np.empty((1, height, width, 2), dtype=np.float32)
    grid[0, :, :, 0] = x * r[0, 0] + y * r[1, 0] + r[2, 0]
    grid[0, :, :, 1] = x * r[0, 1] + y * r[1, 1] + r[2, 1]
    return torch.from_numpy(grid)


@functools.cache
def _numpy_grid_matches_bmm() -> bool:
    """Whether _grid_by_numpy equals _grid_by_bmm on this machine, on probes of the policies' kinds
    (a fused multiply-add in the BLAS kernel would round differently and show up here)."""
    probes = [
        (224, 300, _torchvision_inverse_matrix((0.0, 0.0), -17.0, (0.0, 0.0), (0.0, 0.0))),
        (45, 60, _torchvision_inverse_matrix((-30.0, -22.5), 0.0, (0.0, 0.0), (math.degrees(math.atan(0.12)), 0.0))),
        (37, 23, _torchvision_inverse_matrix((-11.5, -18.5), 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(-0.2))))),
        (32, 32, _torchvision_inverse_matrix((0.0, 0.0), 0.0, (5.0, -3.0), (0.0, 0.0))),
    ]
    return all(torch.equal(_grid_by_numpy(h, w, m), _grid_by_bmm(h, w, m)) for h, w, m in probes)


@functools.lru_cache(maxsize=SOURCE_MAP_CACHE_SIZE)
def _source_maps(height: int, width: int, inverse_centered: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Whole-pixel source (x, y) of every output pixel, -1 where it falls outside the image.

    Found by torchvision's own float32 steps: its grid (``_affine_grid``: centred pixel coordinates
    times the inverse matrix divided by half the size) and ``grid_sample`` (nearest,
    align_corners=False, zero padding) applied to an image of pixel coordinates. The matrix is
    ours (``_torchvision_inverse_matrix``, its float64 terms in another order), which gave the same
    float32 theta in every case tried; so the pixels are torchvision's, ties included
    (tests/test_augment_ops.py), where cv2.warpAffine's own 1/1024-pixel fixed point picked the other
    neighbour near ties (0.2 % of rotated pixels, up to 2.7 % at shear 0.12; which ones changed with
    the OpenCV release). grid_sample stays torch's: its vectorised kernel unnormalises coordinates
    in its own order. A new (size, matrix) costs ~0.15 ms at 32 px and ~0.5 ms at 224 x 300 px;
    see SOURCE_MAP_CACHE_SIZE.
    """
    make_grid = _grid_by_numpy if _numpy_grid_matches_bmm() else _grid_by_bmm
    grid = make_grid(height, width, inverse_centered)
    # an image of (column + 1, row + 1): whole numbers, exact in float32; the zero padding marks "outside"
    columns = torch.arange(1, width + 1, dtype=torch.float32).expand(height, width)
    rows = torch.arange(1, height + 1, dtype=torch.float32).unsqueeze(-1).expand(height, width)
    source = grid_sample(torch.stack([columns, rows]).unsqueeze(0), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)[0].numpy() - 1  # -1 outside the image: cv2.remap's zero border
    map_x, map_y = np.ascontiguousarray(source[0]), np.ascontiguousarray(source[1])
    map_x.setflags(write=False)
    map_y.setflags(write=False)
    return map_x, map_y


def _warp_nearest(img: np.ndarray, inverse_centered: tuple[float, ...]) -> np.ndarray:
    """Nearest-neighbour warp with zero fill, as torchvision's grid_sample (align_corners=False).

    The maps hold whole pixels, so cv2.remap only copies (no rounding of its own). They are cached
    per (size, matrix): the policies draw magnitudes from a few bins, and a cached warp is as fast
    as cv2.warpAffine at 32 and 64 px, 0.8x at 224 px (README, Benchmarks: "Rotate / shear / translate ops").
    """
    height, width = img.shape[:2]
    map_x, map_y = _source_maps(height, width, inverse_centered)
    warped = cv2.remap(img, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return warped.reshape(img.shape)  # cv2 drops a trailing 1-channel axis


def shear_x(img: np.ndarray, amount: float) -> np.ndarray:
    """Shear along x by ``amount`` (tan of the shear angle) around the top-left corner, as
    torchvision's AutoAugment (``F.affine(shear=[degrees(atan(amount)), 0], center=[0, 0])``)."""
    height, width = img.shape[:2]
    shear = (math.degrees(math.atan(amount)), 0.0)
    return _warp_nearest(img, _torchvision_inverse_matrix((-0.5 * width, -0.5 * height), 0.0, (0.0, 0.0), shear))


def shear_y(img: np.ndarray, amount: float) -> np.ndarray:
    height, width = img.shape[:2]
    shear = (0.0, math.degrees(math.atan(amount)))
    return _warp_nearest(img, _torchvision_inverse_matrix((-0.5 * width, -0.5 * height), 0.0, (0.0, 0.0), shear))


def translate(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift by whole pixels (positive = right / down), zero fill."""
    return _warp_nearest(img, _torchvision_inverse_matrix((0.0, 0.0), 0.0, (float(dx), float(dy)), (0.0, 0.0)))


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise about the image centre, same canvas, zero fill (``F.rotate``)."""
    if degrees % 360 == 0:
        return img
    return _warp_nearest(img, _torchvision_inverse_matrix((0.0, 0.0), -degrees, (0.0, 0.0), (0.0, 0.0)))


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area averaging when shrinking to half size or less (bilinear would alias badly there),
    bilinear otherwise (OpenCV's area resampling at mild, non-integer ratios is ~7x slower
    than bilinear and looks the same)."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    interpolation = cv2.INTER_AREA if 2 * height <= h or 2 * width <= w else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interpolation)


def shorter_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) with the shorter side equal to ``size``, as torchvision's ``Resize(size)``
    (the longer side is truncated, not rounded)."""
    if height <= width:
        return size, max(1, int(size * width / height))
    return max(1, int(size * height / width)), size


MAX_ASPECT = 8  # longer / shorter side kept before resizing (see `resize_shorter`)


def central_window(img: np.ndarray, max_aspect: int = MAX_ASPECT) -> np.ndarray:
    """The image with its longer side cut to the central ``max_aspect`` times the shorter one (a view, no copy);
    unchanged when it is not that elongated."""
    height, width = img.shape[:2]
    if width > max_aspect * height:
        left = (width - max_aspect * height) // 2
        return img[:, left:left + max_aspect * height]
    if height > max_aspect * width:
        top = (height - max_aspect * width) // 2
        return img[top:top + max_aspect * width]
    return img


def resize_shorter(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size``. An image more than MAX_ASPECT times longer than wide (or wider than high) is first
    cut to its central window of that shape: a 1 x 3,000,000 strip grew to 16 x 48,000,000 pixels (5.3 GB, a
    few-KB PNG), while every view of it uses a square near its middle (eval) or a crop of the resized strip."""
    img = central_window(img)
    return resize(img, *shorter_side_shape(img.shape[0], img.shape[1], size))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Centre ``size`` x ``size`` crop (zero padding where the image is smaller), as ``F.center_crop``."""
    height, width = img.shape[:2]
    top = int(round((height - size) / 2.0)) if height >= size else -((size - height) // 2)
    left = int(round((width - size) / 2.0)) if width >= size else -((size - width) // 2)
    return place(img, size, top, left, flip=False)


def random_offset(length: int, size: int, u: float) -> int:
    """Offset of the output window in a side of ``length``, from a uniform ``u`` in [0, 1).

    >= 0: crop start inside the image; < 0: the image sits ``-offset`` pixels into a
    zero-padded output. Either way every position is equally likely.
    """
    slack = length - size
    pick = min(int(u * (abs(slack) + 1)), abs(slack))
    return pick if slack >= 0 else -pick


def place(img: np.ndarray, size: int, top: int, left: int, flip: bool) -> np.ndarray:
    """Copy the ``size`` x ``size`` window starting at (top, left) into a new zero image
    (negative offsets pad), mirrored left-right if ``flip``. Always returns a new array."""
    height, width = img.shape[:2]
    src_y0, dst_y0 = max(top, 0), max(-top, 0)
    src_x0, dst_x0 = max(left, 0), max(-left, 0)
    rows = min(height - src_y0, size - dst_y0)
    cols = min(width - src_x0, size - dst_x0)
    block = img[src_y0 : src_y0 + rows, src_x0 : src_x0 + cols]
    if flip:
        # mirror the whole output: the block lands mirrored at the mirrored position
        dst_x0 = size - dst_x0 - cols
        block = cv2.flip(block, 1).reshape(block.shape)  # cv2 drops a trailing 1-channel axis
        if rows == cols == size:
            return block  # cv2.flip already made a new array
    if rows == cols == size:
        return block.copy()
    out = np.zeros((size, size) + img.shape[2:], dtype=np.uint8)
    out[dst_y0 : dst_y0 + rows, dst_x0 : dst_x0 + cols] = block
    return out
