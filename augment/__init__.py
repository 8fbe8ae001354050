"""Augmentation policies S1-S4 (Zoph et al. 2020) and the eval transform.

    spec = parse_policy("s4-n2-m10")          # frozen PolicySpec; str(spec) -> "s4-n2-m10-j0.5:2.0"
    policy = build_policy(spec, size=32)      # policy(image, seed=...) -> uint8 (size, size, C)
    eval_tf = build_eval_transform(size=32)   # resize shorter side + centre crop

albumentations stays behind this package: nothing outside ``augment/`` imports it.
"""

import os

# albumentations asks PyPI for a newer version on import (a network call with a 2 s timeout,
# in every process that imports it); training runs should not. Set before the first import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from augment.policies import EvalTransform, Policy, build_eval_transform, build_policy  # noqa: E402
from augment.spec import PolicyError, PolicySpec, parse_policy  # noqa: E402

__all__ = [
    "EvalTransform",
    "Policy",
    "PolicyError",
    "PolicySpec",
    "build_eval_transform",
    "build_policy",
    "parse_policy",
]
