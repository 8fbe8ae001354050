"""Streaming unlabeled shards into eval-transformed uint8 batches, skip-and-count.

Used by pseudo-labeling: each DataLoader worker takes whole shards, so a
shard's batches come from one worker in order, followed by an end-of-shard
record with its count and problems. Images are never re-encoded or copied; a shard
is a local file or a URL (`shard_io`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.loader import Transform, pinned
from pipeline.data.shard_io import ShardLocation, shard_basename
from pipeline.data.shards import IMAGE_KEYS, ReadProblems, ShardError, decode_image, iter_shard


@dataclass
class ShardBatch:
    shard: int  # index into the stream's shard list
    keys: list[str]
    images: torch.Tensor  # uint8 NCHW (channels_last strides)

    def pin_memory(self) -> "ShardBatch":
        return pinned(self)


@dataclass
class ShardEnd:
    shard: int
    count: int
    problems: dict


class UnlabeledShardStream(IterableDataset):
    def __init__(self, shards: list[ShardLocation], transform: Transform, batch_size: int, mode: str,
                 image_keys: Sequence[str] = IMAGE_KEYS):
        self.shards, self.transform, self.batch_size, self.mode = shards, transform, batch_size, mode
        self.image_keys = tuple(image_keys)

    def _batch(self, shard: int, keys: list[str], images: list[np.ndarray]) -> ShardBatch:
        return ShardBatch(shard, list(keys), torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))

    def __iter__(self) -> Iterator[ShardBatch | ShardEnd]:
        worker = get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker else (0, 1)
        for index in range(wid, len(self.shards), nworkers):
            path = self.shards[index]
            name = shard_basename(path)
            problems = ReadProblems()
            keys: list[str] = []
            images: list[np.ndarray] = []
            count = 0
            seen: set[str] = set()
            for sample in iter_shard(path, on_error="skip", problems=problems):
                key = str(sample["__key__"])
                if key in seen:  # labels are joined by key: a second sample under one key is skipped, named
                    problems.skipped.append({"shard": name, "key": key,
                                             "reason": f"duplicate __key__ in shard {name} (the first is kept)"})
                    continue
                seen.add(key)
                try:
                    image = decode_image(sample, path, self.mode, self.image_keys)
                except ShardError as exc:
                    problems.skipped.append({"shard": name, "key": key, "reason": str(exc)})
                    continue
                keys.append(key)
                images.append(self.transform(image))
                count += 1
                if len(images) == self.batch_size:
                    yield self._batch(index, keys, images)
                    keys, images = [], []
            if images:
                yield self._batch(index, keys, images)
            yield ShardEnd(index, count, problems.as_dict())


def _as_is(item: ShardBatch | ShardEnd) -> ShardBatch | ShardEnd:
    return item


def stream_loader(shards: list[ShardLocation], transform: Transform, batch_size: int, mode: str,
                  workers: int, image_keys: Sequence[str] = IMAGE_KEYS) -> DataLoader:
    dataset = UnlabeledShardStream(shards, transform, batch_size, mode, image_keys)
    return DataLoader(dataset, batch_size=None, num_workers=min(workers, max(1, len(shards))),
                      collate_fn=_as_is, prefetch_factor=4 if workers > 0 else None,
                      pin_memory=torch.cuda.is_available())
