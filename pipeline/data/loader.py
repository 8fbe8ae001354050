"""Training batches that are a pure function of (seed, step).

Each data source is an endless stream: epoch e of source s is the
permutation drawn from (seed, s, e), with one augmentation seed per position.
A step takes the next `per_step` items of every source, so the data position
at step k is k * per_step for each source: resuming needs no replay of the
stream. Augmentation is seeded per item, so results do not depend on worker
count or timing. Under several processes, rank r takes items r, r+W, ... of
each step's slice.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

T = TypeVar("T")

Transform = Callable[..., np.ndarray]
Item = tuple[int, int, int]  # (source, index, augmentation seed)


def epoch_order(n: int, seed: int, source: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Permutation of range(n) and per-position augmentation seeds for one epoch of one source."""
    rng = np.random.default_rng([seed, source, epoch])
    return rng.permutation(n), rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)


@dataclass(frozen=True)
class Source:
    """`population[i]` is the dataset index of stream position i within an epoch (repeats allowed)."""

    population: np.ndarray
    per_step: int


class StreamPosition:
    """Reads positions [start, start+count) of an endless, epoch-permuted stream."""

    def __init__(self, source: Source, source_id: int, seed: int):
        self.source, self.source_id, self.seed = source, source_id, seed
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k >= epoch - 1}
            order, seeds = epoch_order(len(self.source.population), self.seed, self.source_id, epoch)
            self._cache[epoch] = (self.source.population[order], seeds)
        return self._cache[epoch]

    def take(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        if count == 0:  # a source that contributes nothing this run (e.g. distill.labeled_batch: 0)
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        n = len(self.source.population)
        index, seeds = [], []
        position = start
        while position < start + count:
            epoch, offset = divmod(position, n)
            take = min(n - offset, start + count - position)
            order, epoch_seeds = self._epoch(epoch)
            index.append(order[offset:offset + take])
            seeds.append(epoch_seeds[offset:offset + take])
            position += take
        return np.concatenate(index), np.concatenate(seeds)


class StepBatchSampler(Sampler[list[Item]]):
    """For each step in [start_step, total_steps): this rank's share of every source's slice."""

    def __init__(self, sources: Sequence[Source], total_steps: int, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1):
        for i, source in enumerate(sources):
            if len(source.population) == 0:
                raise ValueError(f"data source {i} is empty: nothing to train on")
        self.streams = [StreamPosition(s, i, seed) for i, s in enumerate(sources)]
        self.total_steps, self.start_step, self.rank, self.world = total_steps, start_step, rank, world
        uneven = [f"source {i}: {s.per_step} rows" for i, s in enumerate(sources) if s.per_step % world]
        if uneven and rank == 0:
            warnings.warn(f"a step's rows do not split evenly over {world} processes ({'; '.join(uneven)}): DDP "
                          "averages the ranks' mean losses, so a row on a rank with fewer rows weighs slightly more "
                          f"than in one process; a batch size divisible by {world} gives the one-process objective",
                          stacklevel=2)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[Item]]:
        for step in range(self.start_step, self.total_steps):
            batch: list[Item] = []
            for sid, stream in enumerate(self.streams):
                per_step = stream.source.per_step
                index, seeds = stream.take(step * per_step, per_step)
                batch += [(sid, int(i), int(s)) for i, s in
                          zip(index[self.rank::self.world], seeds[self.rank::self.world])]
            yield batch


class AugmentedSources(Dataset):
    """Indexed by (source, index, seed): returns (augmented uint8 HxWxC image, source, index)."""

    def __init__(self, images: Sequence[Sequence[np.ndarray]], transform: Transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return sum(len(x) for x in self.images)

    def __getitem__(self, item: Item) -> tuple[np.ndarray, int, int]:
        source, index, seed = item
        return self.transform(self.images[source][index], seed=seed), source, index


def pinned(batch: T) -> T:
    """A copy of a batch dataclass with its tensors in pinned memory. The DataLoader's pin thread calls a
    batch's own `pin_memory()` and passes any other object through as it is: without this method the
    loaders' `pin_memory=True` pinned nothing, and every `non_blocking` copy to the GPU was synchronous."""
    tensors = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}  # type: ignore[arg-type]
    return dataclasses.replace(batch, **{name: value.pin_memory() for name, value in tensors.items()  # type: ignore
                                         if isinstance(value, torch.Tensor)})


@dataclass
class Batch:
    """uint8 NCHW images (channels_last strides) and where each row came from."""

    images: torch.Tensor
    source: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.index)

    def pin_memory(self) -> "Batch":
        return pinned(self)


def collate_uint8(batch: list[tuple[np.ndarray, int, int]]) -> Batch:
    """Stack to a uint8 NHWC tensor viewed as NCHW: channels_last strides for free."""
    images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)
    return Batch(images, torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch]))


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW -> normalised float on `device`, as one batch op."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    x = x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def make_loader(dataset: Dataset, sampler: Sampler, workers: int, seed: int,
                collate: Callable[[list], Batch] = collate_uint8) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)  # keeps DataLoader from drawing on the global RNG
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      generator=generator, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None, pin_memory=torch.cuda.is_available())


def eval_batches(images: list[np.ndarray], transform: Transform, batch_size: int,
                 workers: int) -> DataLoader:
    """Deterministic, ordered batches for evaluation and labeling."""
    order = [[(0, i, 0) for i in range(lo, min(lo + batch_size, len(images)))]
             for lo in range(0, len(images), batch_size)]
    return DataLoader(AugmentedSources([images], transform), batch_sampler=order, num_workers=workers,
                      collate_fn=collate_uint8, generator=torch.Generator().manual_seed(0),
                      pin_memory=torch.cuda.is_available())
