"""Training batches that are a pure function of (seed, step).

`StepBatchSampler` yields, for every optimizer step from `start_step` on, the
indices of this rank's share of the global batch together with one
augmentation seed per sample. Epoch e uses the permutation drawn from
(seed, e), so resuming at step k needs no replay of the stream: it starts at
epoch k // steps_per_epoch, batch k % steps_per_epoch. Augmentation is
seeded per sample, so results do not depend on worker count or timing.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

Transform = Callable[..., np.ndarray]


def epoch_order(n: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Permutation of range(n) and per-position augmentation seeds for one epoch."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n), rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    def __init__(self, n: int, global_batch: int, total_steps: int, seed: int,
                 start_step: int = 0, rank: int = 0, world: int = 1):
        self.n, self.global_batch, self.total_steps = n, min(global_batch, n), total_steps
        self.seed, self.start_step, self.rank, self.world = seed, start_step, rank, world
        self.steps_per_epoch = max(1, n // self.global_batch)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached_epoch, order, seeds = -1, None, None
        for step in range(self.start_step, self.total_steps):
            epoch, batch = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                order, seeds = epoch_order(self.n, self.seed, epoch)
                cached_epoch = epoch
            lo = batch * self.global_batch
            idx = order[lo:lo + self.global_batch][self.rank::self.world]
            sd = seeds[lo:lo + self.global_batch][self.rank::self.world]
            yield list(zip(idx.tolist(), sd.tolist()))


class AugmentedImages(Dataset):
    """Indexed by (index, seed): returns (uint8 HxWxC augmented image, label)."""

    def __init__(self, images: list[np.ndarray], labels: np.ndarray, transform: Transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, seed = item
        return self.transform(self.images[index], seed=seed), int(self.labels[index])


def collate_uint8(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack to a uint8 NHWC tensor viewed as NCHW: channels_last strides for free."""
    images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)
    return images, torch.tensor([b[1] for b in batch], dtype=torch.int64)


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW -> normalised float on `device`, as one batch op."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    x = x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def make_loader(dataset: Dataset, sampler: Sampler, workers: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)  # keeps DataLoader from drawing on the global RNG
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_uint8,
                      generator=generator, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None, pin_memory=torch.cuda.is_available())


def eval_batches(images: list[np.ndarray], transform: Transform, batch_size: int,
                 workers: int) -> DataLoader:
    """Deterministic, ordered batches for evaluation and labeling."""
    dataset = AugmentedImages(images, np.zeros(len(images), dtype=np.int64), transform)
    order = [[(i, 0) for i in range(lo, min(lo + batch_size, len(images)))]
             for lo in range(0, len(images), batch_size)]
    return DataLoader(dataset, batch_sampler=order, num_workers=workers, collate_fn=collate_uint8,
                      generator=torch.Generator().manual_seed(0))
