"""Webdataset tar shards: atomic writing, strict or skip-and-count reading.

A shard is a plain tar in webdataset layout: members `KEY.png`, `KEY.cls`,
grouped by `__key__`. Writing goes through `webdataset.TarWriter` into a
temporary file that is renamed when complete. Reading walks the tar stream
directly so that errors can name the shard, the key and the position.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import cv2
import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from pipeline.core.atomic import atomic_open, sha256_file
from pipeline.data.tarstream import TarDamaged, iter_members

OnError = Literal["raise", "skip"]


class ShardError(RuntimeError):
    """A shard or a sample in it cannot be read; the message names both."""


@dataclass
class ReadProblems:
    """Skip-and-count record for lenient (unlabeled) reading."""

    skipped: list[dict[str, str]] = field(default_factory=list)  # {shard, key, reason}
    truncated: list[dict[str, str]] = field(default_factory=list)  # {shard, after_key, reason}

    def as_dict(self) -> dict[str, object]:
        return {"skipped": self.skipped, "truncated": self.truncated,
                "num_skipped": len(self.skipped), "num_truncated": len(self.truncated)}


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mode = "L" if image.ndim == 2 or image.shape[2] == 1 else "RGB"
    Image.fromarray(image.reshape(image.shape[0], image.shape[1]) if mode == "L" else image, mode).save(
        buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_shards(out_dir: Path, prefix: str, samples: Iterator[dict[str, bytes | str]],
                 shard_size: int) -> list[dict[str, object]]:
    """Write samples ({"__key__", "png", "cls", ...}) into shards of `shard_size`.

    Returns one record per shard: name, count, sha256. Each shard appears under
    its final name only once it is complete.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, object]] = []
    batch: list[dict[str, bytes | str]] = []

    def flush() -> None:
        path = out_dir / shard_name(prefix, len(records))
        with atomic_open(path) as handle:
            writer = wds.TarWriter(handle, encoder=False, mtime=0)  # int mtime: no PAX headers
            try:
                for sample in batch:
                    writer.write(sample)
                writer.close()  # finishes the tar; the handle is ours (atomic_open) and stays open
            except BaseException:
                # tarfile's stream would flush again when collected, into the closed (removed) file
                stream = getattr(writer.tarstream, "fileobj", None)
                if stream is not None:
                    stream.closed = True
                raise
        records.append({"name": path.name, "count": len(batch), "sha256": sha256_file(path)})
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    return records


def iter_shard(path: Path, on_error: OnError = "raise",
               problems: ReadProblems | None = None) -> Iterator[dict[str, bytes | str]]:
    """Yield raw samples {"__key__": str, ext: bytes, ...} from one shard, in order.

    on_error="raise": a truncated or corrupt tar raises ShardError naming the
    shard and the last good key. on_error="skip": the samples read before the
    break are kept and the break is recorded in `problems`.
    """
    current: dict[str, bytes | str] | None = None
    last_key = "<start of shard>"
    try:
        for name, data in iter_members(path):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                last_key = str(current["__key__"])
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext.lower()] = data
    except (TarDamaged, OSError, UnicodeDecodeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        if on_error == "raise":
            raise ShardError(f"shard {path} is truncated or corrupt after key '{last_key}' ({reason})") from exc
        if problems is not None:
            problems.truncated.append({"shard": path.name, "after_key": last_key, "reason": reason})
        return  # the partial sample at the break is dropped: it may be incomplete
    if current is not None:
        yield current


def _decode_fast(data: bytes, mode: str) -> np.ndarray | None:
    """OpenCV decode (4x faster than PIL on small PNGs) when no mode conversion is needed, else None."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint8:
        return None
    if array.ndim == 2 and mode == "L":
        return array
    if array.ndim == 3 and array.shape[2] == 3 and mode == "RGB":
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return None  # palette/alpha/16-bit or a mode conversion: PIL's rules apply


def decode_image(sample: dict[str, bytes | str], shard: Path, mode: str) -> np.ndarray:
    """Decode the image of a raw sample to uint8 HxWxC in `mode` ("L" or "RGB")."""
    key = sample["__key__"]
    ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in sample), None)
    if ext is None:
        raise ShardError(f"shard {shard}, key '{key}': no image member (.png/.jpg); has {sorted(k for k in sample if k != '__key__')}")
    array = _decode_fast(sample[ext], mode)
    if array is None:
        try:
            with Image.open(io.BytesIO(sample[ext])) as image:
                array = np.asarray(to_8bit_opaque(image).convert(mode), dtype=np.uint8)
        except Exception as exc:  # PIL raises many types for undecodable bytes
            raise ShardError(f"shard {shard}, key '{key}': image does not decode ({type(exc).__name__}: {exc})") from exc
    return array[:, :, None] if array.ndim == 2 else array


ALPHA_BACKGROUND = (0, 0, 0)  # transparent pixels become black, the background of Fashion-MNIST-like data


def to_8bit_opaque(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (value / 257; PIL's convert would clip it to white), and an
    image with transparency composited over ALPHA_BACKGROUND (its hidden RGB must not show through)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.int64)
        return Image.fromarray(((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def decode_label(sample: dict[str, bytes | str], shard: Path, num_classes: int) -> int:
    key = sample["__key__"]
    if "cls" not in sample:
        raise ShardError(f"shard {shard}, key '{key}': missing 'cls' (the class index) in a labeled shard")
    raw = sample["cls"]
    try:
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        raise ShardError(f"shard {shard}, key '{key}': 'cls' is not an integer: {raw[:20]!r}") from None
    if not 0 <= label < num_classes:
        raise ShardError(f"shard {shard}, key '{key}': class {label} is outside 0..{num_classes - 1}")
    return label
