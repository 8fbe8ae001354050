"""Built policies: the output contract, seeding (also in DataLoader workers), scale jitter,
crop / pad / flip, and the eval transform."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from augment import PolicyError, build_eval_transform, build_policy

POLICIES = ["s1", "s2", "s3", "s4", "s4-n3-m7", "s3-j0.5:2.0"]
RNG = np.random.default_rng(99)
INPUTS = {
    "gray_hw": RNG.integers(0, 256, (28, 28)).astype(np.uint8),
    "gray_hw1": RNG.integers(0, 256, (28, 28, 1)).astype(np.uint8),
    "rgb": RNG.integers(0, 256, (28, 28, 3)).astype(np.uint8),
    "rgb_small": RNG.integers(0, 256, (8, 11, 3)).astype(np.uint8),
    "rgb_large_nonsquare": RNG.integers(0, 256, (300, 180, 3)).astype(np.uint8),
    "gray_wide": RNG.integers(0, 256, (20, 90)).astype(np.uint8),
    "one_pixel": np.array([[[200, 10, 30]]], dtype=np.uint8),
    "rgb_strided": RNG.integers(0, 256, (40, 80, 3)).astype(np.uint8)[:, ::2],
}


def _transforms(size: int) -> list:
    return [build_policy(p, size=size) for p in POLICIES] + [build_eval_transform(size=size)]


@pytest.mark.parametrize("size", [32, 17])
@pytest.mark.parametrize("key", sorted(INPUTS))
def test_output_shape_dtype_contiguity(key: str, size: int) -> None:
    image = INPUTS[key]
    before = image.copy()
    channels = 1 if image.ndim == 2 or image.shape[2] == 1 else 3
    for transform in _transforms(size):
        for seed in (0, 1, None):
            out = transform(image, seed=seed)
            assert out.shape == (size, size, channels), (transform, out.shape)
            assert out.dtype == np.uint8 and out.flags.c_contiguous
            assert not np.shares_memory(out, image)
    assert np.array_equal(image, before), "a policy modified its input"


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 4), np.uint8), np.zeros((0, 8), np.uint8), [[1, 2]]]
)
def test_bad_images_raise_value_error(bad) -> None:
    for transform in (build_policy("s4"), build_eval_transform()):
        with pytest.raises(ValueError, match="image"):
            transform(bad, seed=0)


def test_bad_arguments() -> None:
    with pytest.raises(PolicyError):
        build_policy("s9")
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="size"):
            build_policy("s1", size=size)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="size"):
            build_eval_transform(size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", POLICIES)
def test_same_seed_same_output_different_seeds_differ(text: str) -> None:
    image = INPUTS["rgb"]
    policy = build_policy(text, size=32)
    first = [policy(image, seed=s) for s in range(12)]
    again = build_policy(text, size=32)  # a fresh object: no hidden state
    for s in reversed(range(12)):  # call order does not matter
        assert np.array_equal(again(image, seed=s), first[s])
    assert len({out.tobytes() for out in first}) >= 11
    assert np.array_equal(policy(image, seed=(7, 3, 1)), policy(image, seed=(7, 3, 1)))
    assert not np.array_equal(policy(image, seed=(7, 3, 1)), policy(image, seed=(7, 3, 2)))
    # Unseeded calls draw fresh randomness. S1 on a 28-px image has only ~560 distinct outcomes (the
    # likeliest 3.8 %), so "5 distinct of 6" failed in 0.6 % of runs; fewer than 12 of 20 did not
    # occur in 200,000 simulated draws, while a fixed or cycling seed gives a handful at most.
    unseeded = [policy(image).tobytes() for _ in range(20)]
    assert len(set(unseeded)) >= 12


@pytest.mark.parametrize("seed", [-1, 1.5, "7", (1, -2), (1, 2.0), True])
def test_bad_seeds_raise_value_error(seed) -> None:
    with pytest.raises(ValueError, match="seed"):
        build_policy("s1")(INPUTS["rgb"], seed=seed)


def test_numpy_integer_seeds_equal_python_ints() -> None:
    policy = build_policy("s4")
    assert np.array_equal(policy(INPUTS["rgb"], seed=np.int64(9)), policy(INPUTS["rgb"], seed=9))
    assert np.array_equal(policy(INPUTS["rgb"], seed=np.array([4, 5])), policy(INPUTS["rgb"], seed=(4, 5)))


class _Augmented(Dataset):
    def __init__(self, images: list[np.ndarray], policy, seeded: bool) -> None:
        self.images, self.policy, self.seeded = images, policy, seeded

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.policy(self.images[index], seed=index if self.seeded else None))


def test_seeded_outputs_are_identical_in_dataloader_workers() -> None:
    images = [RNG.integers(0, 256, (28, 28)).astype(np.uint8) for _ in range(16)]
    policy = build_policy("s4", size=32)
    expected = np.stack([policy(img, seed=i) for i, img in enumerate(images)])
    loader = DataLoader(_Augmented(images, policy, seeded=True), batch_size=4, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    assert np.array_equal(got, expected)


def test_unseeded_forked_workers_do_not_repeat_each_other() -> None:
    image = INPUTS["rgb"]
    policy = build_policy("s4", size=32)
    policy(image)  # the parent's internal generator exists before the workers fork
    loader = DataLoader(_Augmented([image] * 4, policy, seeded=False), batch_size=2, num_workers=2)
    first, second = list(loader)  # batch 0 from worker 0, batch 1 from worker 1
    assert not torch.equal(first, second)


def test_policy_pickles_and_keeps_its_outputs() -> None:
    policy = build_policy("s4-n3-m7", size=32)
    clone = pickle.loads(pickle.dumps(policy))
    assert np.array_equal(clone(INPUTS["rgb"], seed=5), policy(INPUTS["rgb"], seed=5))
    assert str(clone) == str(policy) == "s4-n3-m7-j0.5:2.0"


def _ramp(size: int) -> np.ndarray:
    """Grayscale ramp 2 + 3x: after a resize by f its slope along x is 3 / f."""
    return np.tile((2 + 3 * np.arange(size)).astype(np.uint8), (size, 1))


def _measured_scale(out: np.ndarray) -> float:
    plane = out[:, :, 0].astype(np.float64)
    rows = np.flatnonzero(plane.any(axis=1))
    row = plane[rows[len(rows) // 2]]
    cols = np.flatnonzero(row)
    run = row[cols[0] : cols[-1] + 1][2:-2]  # drop interpolation edge effects
    slope = abs(np.polyfit(np.arange(run.size), run, 1)[0])
    return 3.0 / slope


def _record_scales(policy, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    scales: list[float] = []
    sample = policy.sample_scale

    def recording(rng: np.random.Generator) -> float:
        scales.append(sample(rng))
        return scales[-1]

    monkeypatch.setattr(policy, "sample_scale", recording)
    return scales


def test_scale_jitter_measured_from_pixels_covers_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    size, lo, hi = 64, 0.5, 2.0
    policy = build_policy(f"s1-j{lo}:{hi}", size=size)
    scales = _record_scales(policy, monkeypatch)
    image = _ramp(size)
    measured = []
    for seed in range(300):
        measured.append(_measured_scale(policy(image, seed=seed)))
        effective = round(size * scales[-1]) / size  # the resize rounds to whole pixels
        assert measured[-1] == pytest.approx(effective, rel=0.04)
    assert min(measured) >= lo * 0.96 and max(measured) <= hi * 1.04
    assert min(measured) < lo + 0.05 * (hi - lo) and max(measured) > hi - 0.05 * (hi - lo)


@pytest.mark.parametrize(("text", "lo", "hi"), [("s1", 0.8, 1.2), ("s2", 0.8, 1.2), ("s3", 0.5, 2.0), ("s4", 0.5, 2.0)])
def test_default_jitter_ranges(text: str, lo: float, hi: float, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = build_policy(text, size=32)
    scales = _record_scales(policy, monkeypatch)
    for seed in range(400):
        policy(INPUTS["gray_hw"], seed=seed)
    assert lo <= min(scales) < lo + 0.03 * (hi - lo) and hi - 0.03 * (hi - lo) < max(scales) <= hi


def test_flip_is_horizontal_with_probability_one_half() -> None:
    image = RNG.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    policy = build_policy("s1-j1:1", size=32)  # no scale change: output is the image or its mirror
    flips = 0
    for seed in range(400):
        out = policy(image, seed=seed)
        mirrored = np.array_equal(out, image[:, ::-1])
        assert mirrored or np.array_equal(out, image)
        flips += mirrored
    assert 0.42 < flips / 400 < 0.58


def test_shrunk_images_are_zero_padded_at_random_positions() -> None:
    image = np.full((12, 12), 255, np.uint8)  # base scale 32x32, then x0.5: a 16x16 block in 32x32
    policy = build_policy("s1-j0.5:0.5", size=32)
    corners = set()
    for seed in range(400):
        out = policy(image, seed=seed)[:, :, 0]
        ys, xs = np.nonzero(out)
        assert ys.size == 16 * 16 and np.ptp(ys) == np.ptp(xs) == 15 and (out[ys, xs] == 255).all()
        corners.add((int(ys.min()), int(xs.min())))
    assert {c[0] for c in corners} == {c[1] for c in corners} == set(range(17))  # every offset 0..16


def test_large_images_are_cropped_at_random_positions() -> None:
    wide = np.tile(np.arange(96, dtype=np.uint8), (32, 1))  # value = column; shorter side already 32
    policy = build_policy("s1-j1:1", size=32)
    lefts = {int(policy(wide, seed=s)[0, :, 0].min()) for s in range(600)}  # min = crop start, flipped or not
    assert lefts == set(range(65))


def test_eval_transform_is_deterministic_resize_and_center_crop() -> None:
    eval_tf = build_eval_transform(size=32)
    image = RNG.integers(0, 256, (32, 50, 3)).astype(np.uint8)  # shorter side already 32: pure crop
    expected = F.center_crop(torch.from_numpy(image).permute(2, 0, 1), [32, 32]).permute(1, 2, 0).numpy()
    assert np.array_equal(eval_tf(image), expected)
    assert np.array_equal(eval_tf(image, seed=1), eval_tf(image, seed=2))
    yy, xx = np.mgrid[0:64, 0:100]
    smooth = (128 + 60 * np.sin(xx / 9.0) + 50 * np.cos(yy / 7.0)).astype(np.uint8)
    reference = F.center_crop(F.resize(torch.from_numpy(smooth)[None], [32]), [32, 32])[0].numpy()
    ours = eval_tf(smooth)[:, :, 0]
    # same geometry; cv2's area downscale vs torch's antialiased bilinear differ by a few levels
    assert np.abs(ours.astype(int) - reference.astype(int)).mean() < 3


def test_reprs_are_readable() -> None:
    text = repr(build_policy("s4-n3-m7", size=32))
    for fragment in ("s4-n3-m7-j0.5:2.0", "size=32", "RandAugment(n=3, m=7", "scale_jitter(0.5..2)", "hflip(p=0.5)"):
        assert fragment in text
    assert "AutoAugment(imagenet" in repr(build_policy("s2"))
    assert "center_crop(32)" in repr(build_eval_transform(32))


def test_a_very_elongated_image_is_cut_to_its_central_window_before_resizing() -> None:
    """A 1 x 3,000,000 strip (a few-KB PNG) was resized to 16 x 48,000,000 pixels first: 5.3 GB in `predict`.
    Beyond 8:1 the longer side is cut to its central 8:1 window; a view then costs what an 8:1 image costs."""
    import resource
    import time

    strip = np.zeros((1, 3_000_000, 3), dtype=np.uint8)
    strip[:, 1_500_000 - 2:1_500_000 + 2] = 255  # a mark at the centre: the eval view keeps it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    views = [build_eval_transform(size=16)(strip)] + [build_policy(p, size=16)(strip, seed=0) for p in POLICIES]
    assert all(view.shape == (16, 16, 3) for view in views) and views[0].max() == 255
    assert time.perf_counter() - started < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB: not the gigabytes it took
    moderate = RNG.integers(0, 256, (10, 80, 3)).astype(np.uint8)  # 8:1 and less: untouched
    from augment import geometry

    assert geometry.central_window(moderate) is moderate
    assert geometry.central_window(strip.transpose(1, 0, 2)).shape == (8, 1, 3)
