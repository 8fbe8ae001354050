"""AutoAugment (Cubuk et al. 2019, ImageNet policy) and RandAugment (Cubuk et al. 2020).

Op names, magnitude ranges, signs and the ImageNet sub-policy table follow
``torchvision.transforms.v2.AutoAugment`` / ``RandAugment``, which the tests use as the
reference. Each augmenter works in two steps so that what it does can be inspected:
``sample(rng, height, width)`` draws a plan -- the ops to apply with their signed
magnitudes -- and ``apply_plan(image, plan)`` runs it.

Where torchvision (and so this module) differs from the papers' TensorFlow code: geometric
ops fill with 0, not 128; Solarize's threshold falls as the magnitude rises (255 at 0,
0 at the maximum; TF's rises); Posterize keeps 8 - 4 * strength bits (TF: 4 * strength);
geometric ops sample nearest-neighbour. RandAugment's magnitude M is on a 0..10 scale
where 10 is the maximum of each published range (torchvision: bin M of 11 bins).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from augment import geometry, ops

Plan = list[tuple[str, float]]  # (op name, signed magnitude) in the order applied


class Uniform(Protocol):
    """What sampling needs from a generator: ``random.Random`` and ``numpy.random.Generator`` both fit."""

    def random(self) -> float: ...


# Op name -> kernel(image, signed magnitude); magnitudes have torchvision's meaning
# (torchvision.transforms.v2._auto_augment._AutoAugmentBase._apply_image_or_video_transform).
NAME_TO_OP: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "Identity": lambda img, m: img,
    "ShearX": lambda img, m: geometry.shear_x(img, m),
    "ShearY": lambda img, m: geometry.shear_y(img, m),
    "TranslateX": lambda img, m: geometry.translate(img, int(m), 0),
    "TranslateY": lambda img, m: geometry.translate(img, 0, int(m)),
    "Rotate": lambda img, m: geometry.rotate(img, m),
    "Brightness": lambda img, m: ops.brightness(img, 1.0 + m),
    "Color": lambda img, m: ops.color(img, 1.0 + m),
    "Contrast": lambda img, m: ops.contrast(img, 1.0 + m),
    "Sharpness": lambda img, m: ops.sharpness(img, 1.0 + m),
    "Posterize": lambda img, m: ops.posterize(img, int(m)),
    "Solarize": lambda img, m: ops.solarize(img, 255.0 * m),
    "AutoContrast": lambda img, m: ops.autocontrast(img),
    "Equalize": lambda img, m: ops.equalize(img),
    "Invert": lambda img, m: ops.invert(img),
}

# Op name -> magnitude at strength s in [0, 1] (s = bin / (bins - 1) in torchvision) for an
# image of (height, width). Ops missing here take no magnitude.
LEVEL_TO_MAGNITUDE: dict[str, Callable[[float, int, int], float]] = {
    "ShearX": lambda s, h, w: 0.3 * s,
    "ShearY": lambda s, h, w: 0.3 * s,
    "TranslateX": lambda s, h, w: 150.0 / 331.0 * w * s,  # 150 px at 331 px in the paper
    "TranslateY": lambda s, h, w: 150.0 / 331.0 * h * s,
    "Rotate": lambda s, h, w: 30.0 * s,  # degrees
    "Brightness": lambda s, h, w: 0.9 * s,  # enhance factor 1 +- 0.9
    "Color": lambda s, h, w: 0.9 * s,
    "Contrast": lambda s, h, w: 0.9 * s,
    "Sharpness": lambda s, h, w: 0.9 * s,
    "Posterize": lambda s, h, w: float(round(8.0 - 4.0 * s)),  # bits 8..4; round() ties to even, like torch
    "Solarize": lambda s, h, w: 1.0 - s,  # threshold as a fraction of 255
}
# Ops whose magnitude gets a random sign (probability 1/2).
SIGNED_OPS = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
)

# The ImageNet policy of AutoAugment: 25 sub-policies of two (op, probability, magnitude bin
# 0..9 or None) -- torchvision's AutoAugmentPolicy.IMAGENET table, duplicates included.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
AUTOAUGMENT_BINS = 10  # magnitude bins 0..9

# RandAugment's op list (Cubuk et al. 2020, as torchvision.transforms.v2.RandAugment).
RANDAUGMENT_OPS: tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
RANDAUGMENT_MAX_MAGNITUDE = 10.0


def magnitude_of(name: str, strength: float, height: int, width: int, rng: Uniform) -> float:
    """Signed magnitude of op ``name`` at ``strength`` in [0, 1]; 0.0 for ops without one."""
    level = LEVEL_TO_MAGNITUDE.get(name)
    if level is None:
        return 0.0
    magnitude = level(strength, height, width)
    if name in SIGNED_OPS and rng.random() < 0.5:
        magnitude = -magnitude
    return magnitude


def apply_plan(img: np.ndarray, plan: Plan) -> np.ndarray:
    for name, magnitude in plan:
        img = NAME_TO_OP[name](img, magnitude)
    return img


def _op_range(name: str, strength: float) -> str:
    """Readable range of an op at a strength, for reprs (translate is shown per image side)."""
    if name not in LEVEL_TO_MAGNITUDE:
        return name
    if name.startswith("Translate"):
        return f"{name}(±{150.0 / 331.0 * strength:.3g}*side)"
    value = LEVEL_TO_MAGNITUDE[name](strength, 1, 1)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return f"{name}({1 - value:.3g}..{1 + value:.3g})"
    if name == "Posterize":
        return f"{name}({int(value)} bits)"
    if name == "Solarize":
        return f"{name}(>={255 * value:.4g})"
    return f"{name}(±{value:.3g})"


class AutoAugment:
    """AutoAugment with the ImageNet policy: one of the 25 sub-policies drawn uniformly, each
    of its two ops applied with its own probability at its fixed magnitude bin."""

    def __init__(self, policy: Sequence[Sequence[tuple[str, float, int | None]]] = IMAGENET_POLICY) -> None:
        for sub_policy in policy:
            for name, _, _ in sub_policy:
                if name not in NAME_TO_OP:
                    raise ValueError(f"unknown op {name!r} in AutoAugment policy")
        self.policy = tuple(tuple(sub) for sub in policy)

    def sample(self, rng: Uniform, height: int, width: int) -> Plan:
        sub_policy = self.policy[min(int(rng.random() * len(self.policy)), len(self.policy) - 1)]
        plan: Plan = []
        for name, probability, level in sub_policy:
            if rng.random() < probability:
                strength = 0.0 if level is None else level / (AUTOAUGMENT_BINS - 1)
                plan.append((name, magnitude_of(name, strength, height, width, rng)))
        return plan

    def __call__(self, img: np.ndarray, rng: Uniform) -> np.ndarray:
        return apply_plan(img, self.sample(rng, img.shape[0], img.shape[1]))

    def __repr__(self) -> str:
        def op(name: str, p: float, level: int | None) -> str:
            return f"{_op_range(name, 0.0 if level is None else level / (AUTOAUGMENT_BINS - 1))}@p{p:g}"

        subs = ", ".join(f"[{op(*a)}, {op(*b)}]" for a, b in self.policy)
        return f"AutoAugment(imagenet, {len(self.policy)} sub-policies: {subs})"


class RandAugment:
    """RandAugment: ``num_ops`` ops drawn uniformly (with replacement) from ``op_names`` for
    every image, all at ``magnitude`` on the 0..10 scale (10 = the published maximum)."""

    def __init__(self, num_ops: int = 2, magnitude: float = 10.0, op_names: Sequence[str] = RANDAUGMENT_OPS) -> None:
        if num_ops < 0 or int(num_ops) != num_ops:
            raise ValueError(f"num_ops must be a non-negative integer, got {num_ops}")
        if not 0.0 <= magnitude <= RANDAUGMENT_MAX_MAGNITUDE:
            raise ValueError(f"magnitude must be in [0, {RANDAUGMENT_MAX_MAGNITUDE:g}], got {magnitude}")
        unknown = [name for name in op_names if name not in NAME_TO_OP]
        if unknown or not op_names:
            raise ValueError(f"RandAugment ops must be a non-empty subset of {sorted(NAME_TO_OP)}, got {unknown}")
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.op_names = tuple(op_names)

    def sample(self, rng: Uniform, height: int, width: int) -> Plan:
        strength = self.magnitude / RANDAUGMENT_MAX_MAGNITUDE
        count = len(self.op_names)
        plan: Plan = []
        for _ in range(self.num_ops):
            name = self.op_names[min(int(rng.random() * count), count - 1)]
            plan.append((name, magnitude_of(name, strength, height, width, rng)))
        return plan

    def __call__(self, img: np.ndarray, rng: Uniform) -> np.ndarray:
        return apply_plan(img, self.sample(rng, img.shape[0], img.shape[1]))

    def __repr__(self) -> str:
        strength = self.magnitude / RANDAUGMENT_MAX_MAGNITUDE
        listed = ", ".join(_op_range(name, strength) for name in self.op_names)
        return f"RandAugment(n={self.num_ops}, m={self.magnitude:g}, ops=[{listed}])"
