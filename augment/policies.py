"""The S1-S4 training policies and the eval transform (Zoph et al. 2020, classification).

Every policy: resize the shorter side to ``size`` (the eval base scale), then
[AutoAugment (s2, s3) | RandAugment (s4)], then scale jitter (resize by a factor
f ~ U[lo, hi]), a random ``size`` x ``size`` crop (zero padding at a random position
where the image is smaller) and a horizontal flip with p = 0.5. The flip is applied to
the crop: the same distribution as flipping before the crop, on fewer pixels.

Randomness: with ``seed`` given (a non-negative int, or a sequence of them such as
``(run_seed, epoch, index)``), every draw of the call comes from a generator made from that
seed alone, so a (seed, image) pair gives the same output in any process or DataLoader
worker. The generator is Python's ``random.Random`` (Mersenne Twister): seeding it costs
5 us against 9 us for ``numpy.random.default_rng``, and a draw 0.1 us against 0.6 us -- a
fifth of a whole s4 call on a 32x32 image -- and Python guarantees its ``random()``
stream for a given int / bytes seed across versions. With ``seed=None`` an internal
generator is used, re-seeded from OS entropy in each new process, so forked DataLoader
workers do not repeat each other.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np

from augment import geometry
from augment.autoaugment import AutoAugment, RandAugment, Uniform
from augment.spec import PolicySpec, parse_policy

Seed = int | Sequence[int] | None
FLIP_PROBABILITY = 0.5


def as_working(image: np.ndarray) -> np.ndarray:
    """Validate an input image; return it C-contiguous as HxW (grayscale) or HxWx3 (RGB)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must be HxW, HxWx1 or HxWx3, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    return np.ascontiguousarray(image)


def as_output(image: np.ndarray) -> np.ndarray:
    """HxW -> HxWx1; the result is C-contiguous."""
    return np.ascontiguousarray(image[:, :, None] if image.ndim == 2 else image)


def make_rng(seed: Seed) -> random.Random:
    """A generator determined by ``seed`` only (int >= 0, or a sequence / 1-d array of ints >= 0)."""
    if isinstance(seed, np.ndarray) and seed.dtype.kind in "iu":
        seed = seed.tolist()
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        return random.Random(int(seed))
    if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        parts = [int(s) for s in seed if isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0]
        if len(parts) == len(seed):
            return random.Random(("augment-seed:" + ",".join(map(str, parts))).encode())
    raise ValueError(f"seed must be None, an int >= 0 or a sequence of ints >= 0, got {seed!r}")


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


class Policy:
    """A built training policy; call it as ``policy(image, seed=...)``."""

    def __init__(self, spec: PolicySpec, size: int) -> None:
        self.spec = spec
        self.size = _check_size(size)
        self.jitter = spec.jitter
        self.augmenter: AutoAugment | RandAugment | None = None
        if spec.name in ("s2", "s3"):
            self.augmenter = AutoAugment()
        elif spec.name == "s4":
            self.augmenter = RandAugment(num_ops=spec.num_ops or 0, magnitude=spec.magnitude or 0.0)
        self._rng: random.Random | None = None
        self._rng_pid = -1

    def _generator(self, seed: Seed) -> random.Random:
        if seed is not None:
            return make_rng(seed)
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng, self._rng_pid = random.Random(), os.getpid()  # seeded from os.urandom
        return self._rng

    def sample_scale(self, rng: Uniform) -> float:
        """This call's scale-jitter factor (a method of its own so tests can record it)."""
        lo, hi = self.jitter
        return lo + (hi - lo) * rng.random()

    def __call__(self, image: np.ndarray, seed: Seed = None) -> np.ndarray:
        img = as_working(image)
        rng = self._generator(seed)
        img = geometry.resize_shorter(img, self.size)
        if self.augmenter is not None:
            img = self.augmenter(img, rng)
        factor = self.sample_scale(rng)
        height, width = img.shape[:2]
        img = geometry.resize(img, max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))
        top = geometry.random_offset(img.shape[0], self.size, rng.random())
        left = geometry.random_offset(img.shape[1], self.size, rng.random())
        flip = rng.random() < FLIP_PROBABILITY
        return as_output(geometry.place(img, self.size, top, left, flip))

    def __str__(self) -> str:
        return str(self.spec)

    def __repr__(self) -> str:
        steps = [f"resize_shorter({self.size})"]
        if self.augmenter is not None:
            steps.append(repr(self.augmenter))
        lo, hi = self.jitter
        steps += [f"scale_jitter({lo:g}..{hi:g})", f"random_crop_or_pad({self.size})", f"hflip(p={FLIP_PROBABILITY:g})"]
        return f"Policy({self.spec}, size={self.size}: " + " -> ".join(steps) + ")"


class EvalTransform:
    """Deterministic eval view: shorter side to ``size``, centre ``size`` x ``size`` crop."""

    def __init__(self, size: int) -> None:
        self.size = _check_size(size)

    def __call__(self, image: np.ndarray, seed: Seed = None) -> np.ndarray:
        """``seed`` is accepted (so policies and eval are interchangeable) and ignored."""
        img = as_working(image)
        return as_output(geometry.center_crop(geometry.resize_shorter(img, self.size), self.size))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}: resize_shorter({self.size}) -> center_crop({self.size}))"


def build_policy(spec: str | PolicySpec, size: int = 32) -> Policy:
    """Build the training policy ``spec`` ("s1".."s4" with options, or a PolicySpec)."""
    return Policy(parse_policy(spec), size)


def build_eval_transform(size: int = 32) -> EvalTransform:
    return EvalTransform(size)
