"""Op parity: every AutoAugment / RandAugment op against torchvision.transforms.v2.functional
on the same uint8 image, RGB and grayscale.

Tolerances (a "small" allowance is 1% of the pixels, at least one pixel):
- exact, pixel for pixel: brightness, posterize, solarize, autocontrast, equalize, invert,
  identity, shear, translate, rotate (the affine ops take their source pixels from torch's own
  grid and grid_sample, so nearest-neighbour ties fall the same way; cv2.warpAffine's fixed point
  differed on 0.2 % of rotated pixels and on up to 2.7 % at the policies' shear amounts 0.067-0.2);
- contrast / color / sharpness (blends): off by at most 1 on a small allowance of pixels.
  torch computes ``a * r + b * (1 - r)`` in float32 with a fused multiply-add in its
  vectorised loop but with a separate multiply and add in the scalar tail, so the same
  value can truncate to two different integers depending on where it sits in memory when
  the result is within a float32 ulp of an integer. We emulate the FMA (right for all
  but such rare pixels);
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import AutoAugment as TvAutoAugment
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from augment import geometry, ops
from augment.autoaugment import LEVEL_TO_MAGNITUDE, NAME_TO_OP

SHAPES = [(32, 32, 3), (37, 23, 3), (32, 32), (45, 60), (3, 5, 3)]
SMALL_FRACTION = 0.01  # the "small allowance" of differing pixels (see module docstring)
BLEND_OPS = ("contrast", "color", "sharpness", "Contrast", "Color", "Sharpness")


def _images() -> list[np.ndarray]:
    """Uniform noise and a smooth random field (many equal neighbours, narrow histogram) per shape."""
    rng = np.random.default_rng(1234)
    images = []
    for shape in SHAPES:
        images.append(rng.integers(0, 256, shape).astype(np.uint8))
        field = np.cumsum(rng.normal(0, 6, shape), axis=0) + rng.uniform(60, 180)
        images.append(np.clip(field, 0, 255).astype(np.uint8))
    images.append(np.full((16, 16, 3), 77, np.uint8))  # flat image: autocontrast / equalize no-ops
    return images


IMAGES = _images()


def _torchvision(img: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    chw = torch.from_numpy(np.ascontiguousarray(img if img.ndim == 3 else img[:, :, None])).permute(2, 0, 1)
    out = fn(chw.contiguous()).permute(1, 2, 0).numpy()
    return out if img.ndim == 3 else out[:, :, 0]


def _assert_same(ours: np.ndarray, ref: np.ndarray, *, some_pixels: bool = False, max_diff: int = 255) -> None:
    """Exact, or (``some_pixels``) different on at most 1% of pixels (>= 1) by at most ``max_diff``."""
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    differ = diff.any(axis=2) if diff.ndim == 3 else diff > 0
    allowed = max(1, int(SMALL_FRACTION * differ.size)) if some_pixels else 0
    assert differ.sum() <= allowed, f"{differ.sum()} of {differ.size} pixels differ (allowed {allowed})"
    assert diff.max(initial=0) <= (max_diff if some_pixels else 0)


def _tolerance(name: str) -> dict:
    if name.startswith(BLEND_OPS):
        return {"some_pixels": True, "max_diff": 1}
    return {}


FACTORS = [0.1, 0.37, 1.0, 1.5, 1.9, 0.0]
PIXEL_CASES: list[tuple[str, Callable[[np.ndarray], np.ndarray], Callable[[torch.Tensor], torch.Tensor]]] = []
for f in FACTORS:
    PIXEL_CASES += [
        (f"brightness({f})", lambda i, f=f: ops.brightness(i, f), lambda t, f=f: F.adjust_brightness(t, f)),
        (f"contrast({f})", lambda i, f=f: ops.contrast(i, f), lambda t, f=f: F.adjust_contrast(t, f)),
        (f"color({f})", lambda i, f=f: ops.color(i, f), lambda t, f=f: F.adjust_saturation(t, f)),
        (f"sharpness({f})", lambda i, f=f: ops.sharpness(i, f), lambda t, f=f: F.adjust_sharpness(t, f)),
    ]
for b in range(9):
    PIXEL_CASES.append((f"posterize({b})", lambda i, b=b: ops.posterize(i, b), lambda t, b=b: F.posterize(t, b)))
for th in [0.0, 28.333334, 128.0, 226.66667, 255.0]:
    PIXEL_CASES.append((f"solarize({th})", lambda i, th=th: ops.solarize(i, th), lambda t, th=th: F.solarize(t, th)))
PIXEL_CASES += [
    ("autocontrast", ops.autocontrast, F.autocontrast),
    ("equalize", ops.equalize, F.equalize),
    ("invert", ops.invert, F.invert),
]


def _shear(t: torch.Tensor, x: float, y: float) -> torch.Tensor:
    shear = [math.degrees(math.atan(x)), math.degrees(math.atan(y))]
    return F.affine(t, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])


GEOMETRY_CASES = []
for m in [-0.3, -0.1, 0.0333, 0.16666667, 0.3]:
    GEOMETRY_CASES += [
        (f"shear_x({m})", lambda i, m=m: geometry.shear_x(i, m), lambda t, m=m: _shear(t, m, 0.0)),
        (f"shear_y({m})", lambda i, m=m: geometry.shear_y(i, m), lambda t, m=m: _shear(t, 0.0, m)),
    ]
for d in [-14, -3, 0, 1, 7, 40]:
    GEOMETRY_CASES += [
        (f"tx({d})", lambda i, d=d: geometry.translate(i, d, 0), lambda t, d=d: F.affine(t, 0.0, [d, 0], 1.0, [0.0, 0.0])),
        (f"ty({d})", lambda i, d=d: geometry.translate(i, 0, d), lambda t, d=d: F.affine(t, 0.0, [0, d], 1.0, [0.0, 0.0])),
    ]


@pytest.mark.parametrize(("name", "ours", "ref"), PIXEL_CASES + GEOMETRY_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_op_matches_torchvision(name: str, ours: Callable, ref: Callable) -> None:
    for img in IMAGES:
        before = img.copy()
        _assert_same(ours(img), _torchvision(img, ref), **_tolerance(name))
        assert np.array_equal(img, before), "op modified its input"


# The strengths the policies draw: AutoAugment's bins k / 9 (k = 0..9) and RandAugment's integer M / 10,
# each with either sign; then a seeded sample of other magnitudes for the general claim (ties included).
POLICY_STRENGTHS = sorted({sign * k / 9 for k in range(10) for sign in (1, -1)}
                          | {sign * m / 10 for m in range(11) for sign in (1, -1)})
OTHER_STRENGTHS = [float(v) for v in np.random.default_rng(7).uniform(-1.0, 1.0, 20)]


def _magnitudes(name: str) -> list[float]:
    return [LEVEL_TO_MAGNITUDE[name](s, 32, 32) for s in POLICY_STRENGTHS + OTHER_STRENGTHS]


@pytest.mark.parametrize("angle", _magnitudes("Rotate") + [90.0, 45.0, -135.0])
def test_rotate_matches_torchvision_exactly(angle: float) -> None:
    for img in IMAGES:
        _assert_same(geometry.rotate(img, angle), _torchvision(img, lambda t: F.rotate(t, angle)))


@pytest.mark.parametrize("amount", _magnitudes("ShearX"))
def test_shear_matches_torchvision_exactly(amount: float) -> None:
    for img in IMAGES:
        _assert_same(geometry.shear_x(img, amount), _torchvision(img, lambda t: _shear(t, amount, 0.0)))
        _assert_same(geometry.shear_y(img, amount), _torchvision(img, lambda t: _shear(t, 0.0, amount)))


def test_rotate_and_shear_stay_exact_on_torch_s_own_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback for a CPU whose BLAS rounds torch's bmm otherwise than numpy's float32 grid."""
    monkeypatch.setattr(geometry, "_numpy_grid_matches_bmm", lambda: False)
    geometry._source_maps.cache_clear()
    try:
        for angle, amount in zip(_magnitudes("Rotate")[::4], _magnitudes("ShearX")[::4], strict=True):
            for img in IMAGES:
                _assert_same(geometry.rotate(img, angle), _torchvision(img, lambda t: F.rotate(t, angle)))
                _assert_same(geometry.shear_y(img, amount), _torchvision(img, lambda t: _shear(t, 0.0, amount)))
    finally:
        geometry._source_maps.cache_clear()  # no bmm-made maps left for the other tests


def test_numpy_grid_equals_torch_s_bmm_wherever_its_probe_passes() -> None:
    """The once-per-process probe stands for every size and magnitude the policies use."""
    if not geometry._numpy_grid_matches_bmm():
        pytest.skip("this CPU's bmm rounds otherwise: the ops use torch's grid (tested above)")
    shapes = [(32, 32), (23, 37), (224, 301), (300, 224)]
    for height, width in shapes:
        for strength in POLICY_STRENGTHS + OTHER_STRENGTHS:
            angle = LEVEL_TO_MAGNITUDE["Rotate"](strength, height, width)
            shear = math.degrees(math.atan(LEVEL_TO_MAGNITUDE["ShearX"](strength, height, width)))
            pixels = int(LEVEL_TO_MAGNITUDE["TranslateX"](strength, height, width))
            for matrix in (
                geometry._torchvision_inverse_matrix((0.0, 0.0), -angle, (0.0, 0.0), (0.0, 0.0)),
                geometry._torchvision_inverse_matrix((-0.5 * width, -0.5 * height), 0.0, (0.0, 0.0), (shear, 0.0)),
                geometry._torchvision_inverse_matrix((-0.5 * width, -0.5 * height), 0.0, (0.0, 0.0), (0.0, shear)),
                geometry._torchvision_inverse_matrix((0.0, 0.0), 0.0, (float(pixels), 0.0), (0.0, 0.0)),
            ):
                by_numpy = geometry._grid_by_numpy(height, width, matrix)
                assert torch.equal(by_numpy, geometry._grid_by_bmm(height, width, matrix)), (height, width, matrix)


def test_color_is_identity_on_grayscale() -> None:
    gray = IMAGES[4]
    assert gray.ndim == 2
    for factor in (0.1, 1.9):
        assert np.array_equal(ops.color(gray, factor), gray)


# Every op name through torchvision's own AutoAugment dispatcher, so the meaning of a magnitude
# (1 + m for enhance ops, 255 * m for solarize, int(m) for translate / posterize, shear about
# the top-left corner) is checked, not just the kernels.
DISPATCH_MAGNITUDES = {
    "Identity": [0.0],
    "ShearX": [0.3, -0.16666667],
    "ShearY": [-0.3, 0.1],
    "TranslateX": [14.5, -7.9],
    "TranslateY": [-14.5, 3.0],
    "Rotate": [30.0, -13.333333],
    "Brightness": [0.9, -0.9, 0.3],
    "Color": [0.9, -0.9, 0.3],
    "Contrast": [0.9, -0.9, 0.3],
    "Sharpness": [0.9, -0.9, 0.3],
    "Posterize": [4.0, 5.0, 8.0],
    "Solarize": [1.0, 0.5555556, 0.0],
    "AutoContrast": [0.0],
    "Equalize": [0.0],
    "Invert": [0.0],
}


@pytest.mark.parametrize("name", sorted(NAME_TO_OP))
def test_op_table_matches_torchvision_dispatch(name: str) -> None:
    reference = TvAutoAugment()
    for magnitude in DISPATCH_MAGNITUDES[name]:
        for img in IMAGES:
            expected = _torchvision(
                img,
                lambda t: reference._apply_image_or_video_transform(
                    t, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=reference._fill
                ),
            )
            _assert_same(NAME_TO_OP[name](img, magnitude), expected, **_tolerance(name))


def test_bad_op_arguments_raise_value_error() -> None:
    img = IMAGES[0]
    for call in (
        lambda: ops.brightness(img, -0.1),
        lambda: ops.contrast(img, -1.0),
        lambda: ops.posterize(img, 9),
        lambda: ops.posterize(img, 3.5),
        lambda: ops.solarize(img, 256.0),
    ):
        with pytest.raises(ValueError):
            call()
