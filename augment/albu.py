"""albumentations adapters: our ops and policies as ``ImageOnlyTransform`` subclasses.

The policies themselves do not go through these: albumentations' per-call machinery
(parameter sampling, reseeding a Compose) costs more than a whole policy call on a
32x32 image, so ``Policy`` calls the kernels directly with parameters it drew from one
generator. These classes exist so the same ops can sit inside an ``A.Compose``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema, ImageOnlyTransform

from augment.autoaugment import NAME_TO_OP, SIGNED_OPS
from augment.policies import as_output, as_working, build_policy


class AugmentOp(ImageOnlyTransform):
    """One AutoAugment / RandAugment op with torchvision's semantics, e.g.
    ``AugmentOp("Rotate", 30.0, p=0.5)``; signed ops get a random sign.

    ``magnitude`` means what it means in torchvision's AutoAugment: degrees for Rotate,
    tan(angle) for Shear*, pixels for Translate*, factor - 1 for Brightness / Color /
    Contrast / Sharpness, bits for Posterize, threshold / 255 for Solarize.
    """

    class InitSchema(BaseTransformInitSchema):
        op: str
        magnitude: float

    def __init__(self, op: str, magnitude: float = 0.0, p: float = 0.5) -> None:
        if op not in NAME_TO_OP:
            raise ValueError(f"unknown op {op!r}; known: {sorted(NAME_TO_OP)}")
        super().__init__(p=p)
        self.op = op
        self.magnitude = magnitude

    def get_params(self) -> dict[str, Any]:
        negative = self.op in SIGNED_OPS and self.py_random.random() < 0.5
        return {"magnitude": -self.magnitude if negative else self.magnitude}

    def apply(self, img: np.ndarray, magnitude: float, **params: Any) -> np.ndarray:
        out = NAME_TO_OP[self.op](as_working(img), magnitude)
        return as_output(out) if img.ndim == 3 else out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("op", "magnitude")


class PolicyTransform(ImageOnlyTransform):
    """A whole policy (``"s4-n2-m10"`` ...) inside an albumentations pipeline; the per-call seed
    comes from albumentations' generator, so ``A.Compose(..., seed=...)`` makes it reproducible."""

    class InitSchema(BaseTransformInitSchema):
        policy: str
        size: int

    def __init__(self, policy: str = "s1", size: int = 32, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.policy = str(policy)
        self.size = size
        self._policy = build_policy(policy, size)

    def get_params(self) -> dict[str, Any]:
        return {"seed": int(self.random_generator.integers(2**63))}

    def apply(self, img: np.ndarray, seed: int, **params: Any) -> np.ndarray:
        return self._policy(img, seed=seed)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("policy", "size")
