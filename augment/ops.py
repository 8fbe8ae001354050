"""Pixel ops of AutoAugment / RandAugment on uint8 numpy images.

Every function takes a "working" image -- uint8, C-contiguous, HxW (grayscale) or
HxWx3 (RGB) -- and returns an image of the same shape (the input itself when the op is
a no-op; inputs are never modified). Each reproduces ``torchvision.transforms.v2.functional``
on uint8 tensors (a port of PIL's ImageEnhance / ImageOps) pixel for pixel: float32
arithmetic, clamp to [0, 255], truncation towards zero when casting back to uint8.

albumentations' own functions are used where they give exactly those pixels (brightness,
posterize, invert). The others are written here because albumentations' differ: its
contrast and saturation round and use OpenCV's grayscale weights, its autocontrast rounds
instead of truncating, its PIL-mode equalize reads the cumulative histogram one bin late,
it has no ImageEnhance-style sharpness, and its solarize compares in float64 (torch: the
threshold as float32) and builds its table in a Python loop.

Where the result depends only on the input value the op is a 256-entry lookup table
applied with ``cv2.LUT``: cheap at any image size.
"""

from __future__ import annotations

import cv2
import numpy as np
from albumentations.augmentations.pixel import functional as albu_pixel

_F32 = np.float32
_F64 = np.float64
_RAMP = np.arange(256, dtype=np.float32)
_IDENTITY_LUT = np.arange(256, dtype=np.uint8)
# torchvision's adjust_sharpness smoothing kernel is [[1,1,1],[1,5,1],[1,1,1]] / 13.
_SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32)
# torchvision's rgb_to_grayscale is r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114) in
# float32. Per channel value: the red term as torch rounds it, and the exact float64 products
# g * f32(0.587), b * f32(0.114) that its fused multiply-adds consume.
_LUMA_TERMS = np.stack(
    [
        (_RAMP * _F32(0.2989)).astype(_F64),
        _RAMP.astype(_F64) * _F64(_F32(0.587)),
        _RAMP.astype(_F64) * _F64(_F32(0.114)),
    ],
    axis=-1,
).reshape(256, 1, 3)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Clamp to [0, 255] and truncate, like ``tensor.clamp_(0, 255).to(torch.uint8)``."""
    return np.clip(values, 0, 255).astype(np.uint8)


def _grayscale_floor(img: np.ndarray) -> np.ndarray:
    """torchvision's ``_rgb_to_grayscale_image(..., preserve_dtype=False).floor_()`` for HxWx3, as float64.

    Sums of the float64 terms are exact, so rounding each partial sum once to float32
    reproduces torch's fused multiply-adds bit for bit.
    """
    terms = cv2.LUT(img, _LUMA_TERMS)
    gray = (terms[..., 0] + terms[..., 1]).astype(_F32)
    return np.floor((gray + terms[..., 2]).astype(_F32)).astype(_F64)


def _blend_lut_factor(factor: float) -> np.ndarray:
    """``f32(x * f32(factor))`` for x in 0..255, as float64 (torch's ``image.mul(ratio)``)."""
    return (_RAMP * _F32(factor)).astype(_F64)


def invert(img: np.ndarray) -> np.ndarray:
    return albu_pixel.invert(img)  # 255 - img


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Brightness: blend with black, ``img * factor``."""
    if factor < 0:
        raise ValueError(f"brightness factor must be >= 0, got {factor}")
    return albu_pixel.adjust_brightness_torchvision(img, factor)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Contrast: blend with the mean of the (floored) grayscale image."""
    if factor < 0:
        raise ValueError(f"contrast factor must be >= 0, got {factor}")
    gray = _grayscale_floor(img) if img.ndim == 3 else img
    mean = _F64(_F32(gray.mean(dtype=_F64)))
    # torch: image.mul(factor).add_(mean, alpha=1 - factor), a fused multiply-add in float32
    blended = (mean * _F64(_F32(1.0 - factor)) + _blend_lut_factor(factor)).astype(_F32)
    return cv2.LUT(img, _to_uint8(blended))


def color(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Color (saturation): blend with the grayscale image. Identity on grayscale."""
    if factor < 0:
        raise ValueError(f"color factor must be >= 0, got {factor}")
    if img.ndim == 2:
        return img
    gray = _grayscale_floor(img)[..., None]
    scaled = cv2.LUT(img, _blend_lut_factor(factor))
    # torch: image.mul(factor).add_(gray, alpha=1 - factor), a fused multiply-add in float32
    return _to_uint8((gray * _F64(_F32(1.0 - factor)) + scaled).astype(_F32))


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Sharpness: blend with a 3x3 smoothed image; the 1-pixel border is kept."""
    if factor < 0:
        raise ValueError(f"sharpness factor must be >= 0, got {factor}")
    height, width = img.shape[:2]
    if height <= 2 or width <= 2:
        return img
    # Integer 3x3 sums (exact); sum / 13 is never a .5 tie, so round-half-up in integers gives
    # the same smoothed pixel as torch's float conv2d + round_().
    sums = cv2.filter2D(img, cv2.CV_16S, _SMOOTH_KERNEL)[1:-1, 1:-1]
    inner = img[1:-1, 1:-1]
    delta = (sums * 2 + 13) // 26 - inner
    out = img.copy()
    # torch: inner.add_(smooth - inner, alpha=1 - factor), a fused multiply-add in float32
    out[1:-1, 1:-1] = _to_uint8((delta * _F64(_F32(1.0 - factor)) + inner).astype(_F32))
    return out


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
    """Keep the ``bits`` most significant bits of every value (8 = identity)."""
    if not 0 <= int(bits) <= 8 or int(bits) != bits:
        raise ValueError(f"posterize bits must be an integer in [0, 8], got {bits}")
    if bits == 8:
        return img
    if bits == 0:  # albumentations accepts 1..7
        return np.zeros_like(img)
    return albu_pixel.posterize(img, int(bits))


def solarize(img: np.ndarray, threshold: float) -> np.ndarray:
    """Invert every value ``>= threshold`` (threshold on the 0..255 scale)."""
    if threshold > 255:
        raise ValueError(f"solarize threshold must be <= 255, got {threshold}")
    lut = np.where(_RAMP >= _F32(threshold), 255 - _IDENTITY_LUT, _IDENTITY_LUT).astype(np.uint8)
    return cv2.LUT(img, lut)


def _per_channel_lut(img: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """Apply one 256-entry table per channel; ``luts`` is (C, 256) uint8."""
    if img.ndim == 2:
        return cv2.LUT(img, luts[0])
    return cv2.LUT(img, np.ascontiguousarray(luts.T).reshape(256, 1, 3))


def _histogram(img: np.ndarray, channel: int) -> np.ndarray:
    """Value counts (256,) of one channel, as int64."""
    return cv2.calcHist([img], [channel], None, [256], [0, 256]).ravel().astype(np.int64)


def _channels(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else img.shape[2]


def _autocontrast_lut(lo: int, hi: int) -> np.ndarray:
    """torchvision: (x - min) / ((max - min) * (1/255)) in float32, clamped and truncated."""
    if hi == lo:  # a flat channel is left untouched
        return _IDENTITY_LUT
    inv_scale = _F32(hi - lo) * _F32(1.0 / 255.0)
    return _to_uint8((_RAMP - _F32(lo)) / inv_scale)


def autocontrast(img: np.ndarray) -> np.ndarray:
    """PIL ImageOps.autocontrast (no cutoff): stretch each channel's [min, max] to [0, 255]."""
    if img.ndim == 2:
        lo, hi, _, _ = cv2.minMaxLoc(img)
        return cv2.LUT(img, _autocontrast_lut(int(lo), int(hi)))
    luts = []
    for channel in range(_channels(img)):
        present = np.flatnonzero(_histogram(img, channel))
        luts.append(_autocontrast_lut(int(present[0]), int(present[-1])))
    return _per_channel_lut(img, np.stack(luts))


def _equalize_lut(hist: np.ndarray) -> np.ndarray:
    """PIL's rule (ImageOps.equalize), as torchvision ports it:
    step = (#pixels not of the top value) // 255, lut[k] = (cumsum[k-1] + step // 2) // step."""
    top_count = hist[np.flatnonzero(hist)[-1]]
    step = (int(hist.sum()) - int(top_count)) // 255
    if step == 0:  # (almost) one value: left untouched
        return _IDENTITY_LUT
    lut = np.zeros(256, dtype=np.int64)
    lut[1:] = (np.cumsum(hist[:-1]) + step // 2) // step
    return np.minimum(lut, 255).astype(np.uint8)


def equalize(img: np.ndarray) -> np.ndarray:
    """PIL ImageOps.equalize, per channel.

    albumentations' ``equalize(mode="pil")`` indexes the cumulative histogram one bin
    later than PIL does, so it is not used here.
    """
    luts = np.stack([_equalize_lut(_histogram(img, c)) for c in range(_channels(img))])
    return _per_channel_lut(img, luts)
