"""A few decoded images from an imported data dir or a single shard, for previews."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.imageset import DataDirError, open_data
from pipeline.data.importer import MANIFEST
from pipeline.data.shard_io import ARCHIVE_SUFFIXES, ShardLocation, as_location
from pipeline.data.shards import IMAGE_KEYS, decode_image, iter_shard


def sample_images(source: Path | str, count: int) -> list[np.ndarray]:
    """The first `count` images of a shard (a local archive of any suffix the pipeline reads, or a URL /
    `pipe:` command), of a split folder (RUN/data/labeled), or of a data dir's labeled split."""
    location = as_location(str(source))
    if not isinstance(location, Path):
        return _first_images([location], "RGB", IMAGE_KEYS, count, source)
    source = location
    if source.is_dir() and not (source / MANIFEST).exists() and (source.parent / MANIFEST).exists():
        info = open_data(source.parent)  # a split folder: its parent holds the manifest
        if source.name not in info.manifest["splits"]:
            raise DataDirError(f"--data {source}: not a split of {source.parent} "
                               f"(splits: {', '.join(info.manifest['splits'])})")
        shards, mode, image_keys = info.shard_paths(source.name), info.mode, info.image_keys
    elif source.is_dir():
        info = open_data(source)
        shards = info.shard_paths("labeled") or info.shard_paths("test")
        mode, image_keys = info.mode, info.image_keys
    elif source.name.endswith(ARCHIVE_SUFFIXES) and source.exists():
        shards, mode, image_keys = [source], "RGB", IMAGE_KEYS
    else:
        raise DataDirError(f"--data {source}: expected an imported data directory, a shard "
                           f"({'/'.join(ARCHIVE_SUFFIXES)}) or a shard's URL")
    return _first_images(shards, mode, image_keys, count, source)


def _first_images(shards: list[ShardLocation], mode: str, image_keys: Sequence[str], count: int,
                  source: Path | str) -> list[np.ndarray]:
    images: list[np.ndarray] = []
    for shard in shards:
        for sample in iter_shard(shard):
            image = decode_image(sample, shard, mode, image_keys)
            if mode == "RGB" and (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
                image = image[..., :1]  # a grayscale image read from a bare shard
            images.append(image)
            if len(images) == count:
                return images
    if not images:
        raise DataDirError(f"--data {source}: no images found")
    return images
