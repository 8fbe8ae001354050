"""Fashion-MNIST from its raw idx `.gz` files.

Looked up in order: an explicit directory, Debian's `dataset-fashion-mnist`
package, then the user cache. Nothing is downloaded at run time.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataSourceError(RuntimeError):
    """Raw data is missing or malformed; the message says which file and how to fix it."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selftrain" / "fashion-mnist"


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def locate(source: str | Path | None) -> Path:
    """Return the directory holding all four idx files: `source` if given, else the first default."""
    if source:
        missing = [s for s in FILES.values() if not _find(Path(source), s)]
        if missing:
            raise DataSourceError(f"Fashion-MNIST source {source}: missing {', '.join(m + '.gz' for m in missing)} "
                                  "(a given directory is the only one looked in; without one: "
                                  f"{DEBIAN_DIR} from `apt-get install -y dataset-fashion-mnist`, then {cache_dir()})")
        return Path(source)
    candidates = [DEBIAN_DIR, cache_dir()]
    for directory in candidates:
        if all(_find(directory, stem) for stem in FILES.values()):
            return directory
    raise DataSourceError(
        "Fashion-MNIST raw files not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Install them with `apt-get install -y dataset-fashion-mnist` (Debian), or put "
        + ", ".join(s + ".gz" for s in FILES.values())
        + f" in {cache_dir()} or a directory passed with --source / data.path.")


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataSourceError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataSourceError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    dims = raw[3]
    if dims != expected_dims:
        raise DataSourceError(f"{path}: expected {expected_dims} dimensions, found {dims}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    offset = 4 + 4 * dims
    if len(raw) - offset != int(np.prod(shape)):
        raise DataSourceError(f"{path}: truncated: header says {shape} but holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load(source: str | Path | None = None) -> dict[str, np.ndarray]:
    """Arrays train_images (N,28,28), train_labels (N,), test_images, test_labels."""
    directory = locate(source)
    arrays = {name: _read_idx(_find(directory, stem), 3 if name.endswith("images") else 1)
              for name, stem in FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataSourceError(f"{directory}: {split} images and labels differ in count")
    return arrays
