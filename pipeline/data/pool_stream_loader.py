"""The streamed pool (`pool_stream.py`) as training batches: the batch sampler that mixes labeled slices
with the stream's items, the dataset that decodes them in loader workers, their collation, and the stream
position saved with the training state so that a resume continues at the step it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.data.loader import Batch, Source, StreamPosition, Transform
from pipeline.data.pool import PoolError
from pipeline.data.pool_stream import LABELED, UNLABELED, PoolStream
from pipeline.data.shards import decode_image


class PoolPosition:
    """Registered for checkpointing: the stream snapshot a resume at the trainer's step needs.

    The sampler runs ahead of training (DataLoader prefetch), so it records a snapshot per step it
    produced; `consumed(step)` (called as the training loop takes step's batch) makes the one after
    that step current.
    """

    def __init__(self) -> None:
        self._produced: dict[int, dict] = {}
        self.next_step = 0
        self.snapshot: dict | None = None

    def produced(self, next_step: int, snapshot: dict) -> None:
        self._produced[next_step] = snapshot

    def consumed(self, step: int) -> None:
        self.next_step, self.snapshot = step + 1, self._produced.pop(step + 1)
        self._produced = {k: v for k, v in self._produced.items() if k > step + 1}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (the trainer saves every rank's: engine/per_rank.py)."""
        return {"next_step": self.next_step, "stream": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step, self.snapshot = int(state["next_step"]), state["stream"]

    def resume(self, stream: PoolStream, start_step: int) -> None:
        if start_step == 0:
            return
        if self.next_step != start_step or self.snapshot is None:
            raise PoolError(f"the saved pool stream position is for step {self.next_step}, not {start_step}")
        stream.restore(self.snapshot)


class StreamedMixtureSampler(Sampler[list[tuple]]):
    """Per step: this rank's share of the labeled slice (as `StepBatchSampler`) + its pseudo-labeled items."""

    def __init__(self, labeled: Source, stream: PoolStream, unlabeled_per_step: int, total_steps: int, seed: int,
                 position: PoolPosition, start_step: int = 0, labeled_offset: int = 0):
        if len(labeled.population) == 0:
            raise ValueError("data source 0 is empty: nothing to train on")
        self.labeled, self.stream, self.position = StreamPosition(labeled, LABELED, seed), stream, position
        self.total_steps, self.start_step = total_steps, start_step
        self.labeled_offset = labeled_offset  # steps of the labeled cycle taken before this sampler's step 0
        self.per_rank = len(range(stream.rank, unlabeled_per_step, stream.world))
        position.resume(stream, start_step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple]]:
        rank, world = self.stream.rank, self.stream.world
        for step in range(self.start_step, self.total_steps):
            per_step = self.labeled.source.per_step
            index, seeds = self.labeled.take((self.labeled_offset + step) * per_step, per_step)
            batch: list[tuple] = [(LABELED, int(i), int(s)) for i, s in zip(index[rank::world], seeds[rank::world])]
            batch += [(UNLABELED, *self.stream.next_item()) for _ in range(self.per_rank)]
            self.position.produced(step + 1, self.stream.snapshot())
            yield batch


class StreamedSources(Dataset):
    """Labeled items by index from memory; pseudo-labeled items carry their bytes and target (decoded here)."""

    def __init__(self, labeled: Sequence[np.ndarray], transform: Transform, mode: str):
        self.labeled, self.transform, self.mode = labeled, transform, mode

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, item: tuple) -> tuple[np.ndarray, int, int, np.ndarray | None]:
        if item[0] == LABELED:
            _, index, seed = item
            return self.transform(self.labeled[index], seed=seed), LABELED, index, None
        _, (key, ext, data, target), seed = item
        image = decode_image({"__key__": key, ext: data}, f"pool key {key}", self.mode, (ext,))
        return self.transform(image, seed=seed), UNLABELED, -1, target


@dataclass
class MixedBatch(Batch):
    """A Batch whose pseudo-labeled rows carry their targets: row i of `targets` is the i-th such row."""

    targets: torch.Tensor | None = None


def collate_mixed(batch: list[tuple[np.ndarray, int, int, np.ndarray | None]]) -> MixedBatch:
    images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)
    pseudo = [b[3] for b in batch if b[1] == UNLABELED and b[3] is not None]
    index, seen = [], 0
    for b in batch:  # a pseudo row's index is its row in `targets`
        index.append(b[2] if b[1] == LABELED else seen)
        seen += b[1] == UNLABELED
    targets = torch.from_numpy(np.stack(pseudo)) if pseudo else None  # None: no row has a target
    return MixedBatch(images, torch.tensor([b[1] for b in batch]), torch.tensor(index), targets)


def tracked(loader: Any, position: PoolPosition, start_step: int) -> Iterator[MixedBatch]:
    """The loader's batches; as the training loop takes step k's batch, the position after k becomes current."""
    for step, batch in enumerate(loader, start_step):
        position.consumed(step)
        yield batch
