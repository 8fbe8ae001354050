"""AutoAugment's published ImageNet table and RandAugment's op draws and magnitude ranges."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torchvision.transforms.v2 import AutoAugment as TvAutoAugment
from torchvision.transforms.v2 import AutoAugmentPolicy
from torchvision.transforms.v2 import RandAugment as TvRandAugment

from augment import build_policy
from augment import autoaugment as aa

# Cubuk et al. 2019, "AutoAugment", appendix table of the ImageNet policy: 25 sub-policies,
# each two (operation, probability, magnitude 0..9). Written out here independently of the
# package so a typo in either shows up.
PUBLISHED_IMAGENET = [
    [("Posterize", 0.4, 8), ("Rotate", 0.6, 9)],
    [("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)],
    [("Equalize", 0.8, None), ("Equalize", 0.6, None)],
    [("Posterize", 0.6, 7), ("Posterize", 0.6, 6)],
    [("Equalize", 0.4, None), ("Solarize", 0.2, 4)],
    [("Equalize", 0.4, None), ("Rotate", 0.8, 8)],
    [("Solarize", 0.6, 3), ("Equalize", 0.6, None)],
    [("Posterize", 0.8, 5), ("Equalize", 1.0, None)],
    [("Rotate", 0.2, 3), ("Solarize", 0.6, 8)],
    [("Equalize", 0.6, None), ("Posterize", 0.4, 6)],
    [("Rotate", 0.8, 8), ("Color", 0.4, 0)],
    [("Rotate", 0.4, 9), ("Equalize", 0.6, None)],
    [("Equalize", 0.0, None), ("Equalize", 0.8, None)],
    [("Invert", 0.6, None), ("Equalize", 1.0, None)],
    [("Color", 0.6, 4), ("Contrast", 1.0, 8)],
    [("Rotate", 0.8, 8), ("Color", 1.0, 2)],
    [("Color", 0.8, 8), ("Solarize", 0.8, 7)],
    [("Sharpness", 0.4, 7), ("Invert", 0.6, None)],
    [("ShearX", 0.6, 5), ("Equalize", 1.0, None)],
    [("Color", 0.4, 0), ("Equalize", 0.6, None)],
    [("Equalize", 0.4, None), ("Solarize", 0.2, 4)],
    [("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)],
    [("Invert", 0.6, None), ("Equalize", 1.0, None)],
    [("Color", 0.6, 4), ("Contrast", 1.0, 8)],
    [("Equalize", 0.8, None), ("Equalize", 0.6, None)],
]
# Cubuk et al. 2020, "RandAugment": the op list (as torchvision implements it).
PUBLISHED_RANDAUGMENT_OPS = [
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
]  # fmt: skip


def _as_lists(policy) -> list[list[tuple]]:
    return [[tuple(op) for op in sub] for sub in policy]


def test_autoaugment_table_is_the_published_imagenet_policy() -> None:
    assert len(aa.IMAGENET_POLICY) == 25
    assert all(len(sub) == 2 for sub in aa.IMAGENET_POLICY)
    assert _as_lists(aa.IMAGENET_POLICY) == PUBLISHED_IMAGENET
    assert _as_lists(aa.AutoAugment().policy) == PUBLISHED_IMAGENET
    assert _as_lists(TvAutoAugment(AutoAugmentPolicy.IMAGENET)._policies) == PUBLISHED_IMAGENET


def _tv_magnitudes(space: dict, name: str, bins: int, height: int, width: int) -> list[float] | None:
    values = space[name][0](bins, height, width)
    return None if values is None else [float(v) for v in values]


@pytest.mark.parametrize(("height", "width"), [(32, 32), (224, 160)])
def test_autoaugment_magnitudes_and_signs_match_torchvision(height: int, width: int) -> None:
    space = TvAutoAugment._AUGMENTATION_SPACE
    assert set(space) == set(aa.NAME_TO_OP) - {"Identity"}
    for name in space:
        assert (name in aa.SIGNED_OPS) == space[name][1], name
        expected = _tv_magnitudes(space, name, aa.AUTOAUGMENT_BINS, height, width)
        if expected is None:
            assert name not in aa.LEVEL_TO_MAGNITUDE
            continue
        ours = [aa.LEVEL_TO_MAGNITUDE[name](b / (aa.AUTOAUGMENT_BINS - 1), height, width) for b in range(10)]
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("magnitude", [0, 3, 7, 9, 10])
def test_randaugment_magnitudes_match_torchvision_on_the_0_to_10_scale(magnitude: int) -> None:
    # torchvision's RandAugment with 11 magnitude bins uses bin index == our 0..10 magnitude.
    space = TvRandAugment._AUGMENTATION_SPACE
    assert list(space) == PUBLISHED_RANDAUGMENT_OPS == list(aa.RANDAUGMENT_OPS)
    for name in space:
        expected = _tv_magnitudes(space, name, 11, 32, 48)
        if expected is None:
            continue
        ours = aa.LEVEL_TO_MAGNITUDE[name](magnitude / 10, 32, 48)
        assert ours == pytest.approx(expected[magnitude], rel=1e-6, abs=1e-6), name


def test_published_ranges_at_full_strength() -> None:
    full = {name: level(1.0, 331, 331) for name, level in aa.LEVEL_TO_MAGNITUDE.items()}
    assert full["Rotate"] == 30.0 and full["ShearX"] == full["ShearY"] == 0.3
    assert full["TranslateX"] == pytest.approx(150.0) and full["TranslateY"] == pytest.approx(150.0)
    for enhance in ("Brightness", "Color", "Contrast", "Sharpness"):
        assert full[enhance] == 0.9  # factor 1 +- 0.9, i.e. 0.1 .. 1.9
    assert full["Posterize"] == 4.0 and aa.LEVEL_TO_MAGNITUDE["Posterize"](0.0, 1, 1) == 8.0
    assert full["Solarize"] == 0.0 and aa.LEVEL_TO_MAGNITUDE["Solarize"](0.0, 1, 1) == 1.0


def test_autoaugment_applies_ops_with_their_published_probabilities() -> None:
    augmenter = aa.AutoAugment()
    rng = np.random.default_rng(0)
    draws = 20000
    counts: Counter[str] = Counter()
    for _ in range(draws):
        plan = augmenter.sample(rng, 32, 32)
        assert len(plan) <= 2
        counts.update(name for name, _ in plan)
    expected: Counter[str] = Counter()
    for sub in PUBLISHED_IMAGENET:
        for name, probability, _ in sub:
            expected[name] += probability / len(PUBLISHED_IMAGENET)
    assert set(counts) == {name for name, value in expected.items() if value > 0}
    for name, rate in expected.items():
        assert counts[name] / draws == pytest.approx(rate, abs=0.015), name


def test_autoaugment_signed_magnitudes_take_both_signs() -> None:
    augmenter = aa.AutoAugment()
    rng = np.random.default_rng(1)
    rotations = [m for _ in range(3000) for name, m in augmenter.sample(rng, 32, 32) if name == "Rotate"]
    assert min(rotations) == pytest.approx(-30.0) and max(rotations) == pytest.approx(30.0)
    assert 0.4 < np.mean(np.array(rotations) > 0) < 0.6


@pytest.mark.parametrize(("num_ops", "magnitude"), [(2, 10.0), (3, 7.0), (1, 4.5), (0, 10.0)])
def test_randaugment_draws_n_ops_uniformly_from_the_published_list(num_ops: int, magnitude: float) -> None:
    augmenter = aa.RandAugment(num_ops=num_ops, magnitude=magnitude)
    rng = np.random.default_rng(2)
    draws = 4000
    counts: Counter[str] = Counter()
    for _ in range(draws):
        plan = augmenter.sample(rng, 32, 32)
        assert len(plan) == num_ops
        counts.update(name for name, _ in plan)
    if num_ops == 0:
        return
    assert set(counts) == set(PUBLISHED_RANDAUGMENT_OPS)
    share = 1 / len(PUBLISHED_RANDAUGMENT_OPS)
    for name in PUBLISHED_RANDAUGMENT_OPS:
        assert counts[name] / (draws * num_ops) == pytest.approx(share, abs=0.02), name


def test_randaugment_magnitude_is_fixed_and_signs_random() -> None:
    augmenter = aa.RandAugment(num_ops=2, magnitude=5.0)
    rng = np.random.default_rng(3)
    by_op: dict[str, set[float]] = {}
    for _ in range(3000):
        for name, m in augmenter.sample(rng, 64, 64):
            by_op.setdefault(name, set()).add(round(m, 6))
    assert by_op["Rotate"] == {15.0, -15.0}
    assert by_op["Brightness"] == {0.45, -0.45}
    assert by_op["Posterize"] == {6.0}  # 8 - 4 * 0.5
    assert by_op["Solarize"] == {0.5}
    assert by_op["TranslateX"] == {round(150 / 331 * 64 * 0.5, 6), -round(150 / 331 * 64 * 0.5, 6)}
    assert by_op["Equalize"] == {0.0}


def test_s4_policy_applies_exactly_n_sampled_ops_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instrument the op table: each call of an s4-nN policy runs N ops from the published list."""
    calls: list[str] = []
    for name, op in list(aa.NAME_TO_OP.items()):
        def recording(img: np.ndarray, m: float, name: str = name, op=op) -> np.ndarray:
            calls.append(name)
            return op(img, m)

        monkeypatch.setitem(aa.NAME_TO_OP, name, recording)
    image = np.random.default_rng(4).integers(0, 256, (28, 28)).astype(np.uint8)
    for num_ops in (1, 2, 3):
        policy = build_policy(f"s4-n{num_ops}-m9", size=32)
        for seed in range(50):
            calls.clear()
            policy(image, seed=seed)
            assert len(calls) == num_ops
            assert set(calls) <= set(PUBLISHED_RANDAUGMENT_OPS)


def test_reprs_name_the_ops_and_ranges() -> None:
    text = repr(aa.RandAugment(2, 10.0))
    for fragment in ("n=2", "m=10", "Rotate(±30)", "ShearX(±0.3)", "Brightness(0.1..1.9)", "Posterize(4 bits)"):
        assert fragment in text
    auto = repr(aa.AutoAugment())
    assert "25 sub-policies" in auto and "Posterize(4 bits)@p0.4" in auto


def test_bad_randaugment_arguments() -> None:
    for kwargs in ({"num_ops": -1}, {"magnitude": 10.5}, {"op_names": ["Nope"]}, {"op_names": []}):
        with pytest.raises(ValueError):
            aa.RandAugment(**kwargs)

