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

import cv2  # noqa: E402

# OpenCV's own thread pool does not survive fork: a DataLoader worker forked after this process used
# cv2 can hang for good in cv2.remap (a CI run hung 25 minutes in
# tests/test_augment_policies.py::test_unseeded_forked_workers_do_not_repeat_each_other). The loaders'
# parallelism is their workers; one image of <= 224 px gains nothing from cv2's threads (S4: 0.070 vs
# 0.100 ms at 32 px, 0.73 vs 0.74 ms at 224 px, measured 2026-12-05 on the AMD EPYC with AVX-512).
cv2.setNumThreads(0)

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
