"""Webdataset tar shards: atomic writing, strict or skip-and-count reading.

A shard is a plain tar in webdataset layout: members `KEY.png`, `KEY.cls`,
grouped by `__key__`. Writing goes through `webdataset.TarWriter` into a
temporary file that is renamed when complete. Reading groups the members of a
local file or a URL (`shard_io`) here, so that errors can name the shard, the
key and the position.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import cv2
import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import base_plus_ext

from pipeline.core.atomic import atomic_open, sha256_file
from pipeline.data.shard_io import Fingerprint, ShardLocation, shard_basename, shard_members
from pipeline.data.tarstream import TarDamaged

OnError = Literal["raise", "skip"]
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")  # image members tried, in order (our own imports)
# what a damaged shard raises: our tar reader (a cut or corrupt compressed stream included) and tarfile; an
# OSError (a missing file, I/O, network, a failed pipe command) is the storage's fault: `ShardUnavailable`
STREAM_ERRORS = (TarDamaged, UnicodeDecodeError, tarfile.TarError, EOFError)


class ShardError(RuntimeError):
    """A shard or a sample in it cannot be read; the message names both."""


class ShardUnavailable(ShardError):
    """A shard could not be read (to its end) for a reason outside it: raised whatever `on_error` says, never
    counted as a truncated shard, which would drop its images for good (a rerun reads it again)."""


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


def iter_shard(path: ShardLocation, on_error: OnError = "raise", problems: ReadProblems | None = None,
               fingerprint: Fingerprint | None = None) -> Iterator[dict[str, bytes | str]]:
    """Yield raw samples {"__key__": str, ext: bytes, ...} from one shard (a local file or a URL), in order.

    on_error="raise": a truncated or corrupt tar, or a member that appears twice in one sample,
    raises ShardError naming the shard and the key. on_error="skip": the samples read before a
    break are kept and the break is recorded in `problems`; a sample with a repeated member is
    dropped and recorded. With `fingerprint`, the shard's bytes are hashed as they stream.
    """
    current: dict[str, bytes | str] | None = None
    dropped = False  # the current sample repeats a member
    last_key = "<start of shard>"
    try:
        for name, data in shard_members(path, fingerprint):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                last_key = str(current["__key__"])
                if not dropped:
                    yield current
                current, dropped = None, False
            if current is None:
                current = {"__key__": key}
            ext = ext.lower()
            if ext in current:
                reason = f"member '.{ext}' appears twice (a second '{name}')"
                if on_error == "raise":
                    raise ShardError(f"shard {path}, key '{key}': {reason}")
                if not dropped and problems is not None:
                    problems.skipped.append({"shard": shard_basename(path), "key": key, "reason": reason})
                dropped = True
            current[ext] = data
    except OSError as exc:
        raise ShardUnavailable(f"shard {path} could not be read after key '{last_key}' ({type(exc).__name__}: "
                               f"{exc}); it is not counted as damaged: make it readable and rerun") from exc
    except STREAM_ERRORS as exc:
        reason = f"{type(exc).__name__}: {exc}"
        if on_error == "raise":
            raise ShardError(f"shard {path} is truncated or corrupt after key '{last_key}' ({reason})") from exc
        if problems is not None:
            problems.truncated.append({"shard": shard_basename(path), "after_key": last_key, "reason": reason})
        return  # the partial sample at the break is dropped: it may be incomplete
    if current is not None and not dropped:
        yield current


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_fast(data: bytes, mode: str) -> np.ndarray | None:
    """OpenCV decode (4x faster than PIL on small PNGs) when no mode conversion is needed, else None."""
    if not data:  # cv2.imdecode raises on an empty buffer; PIL's path names the empty file
        return None
    if data.startswith(PNG_SIGNATURE):
        if 0 <= data.find(b"tRNS", 0, max(0, data.find(b"IDAT"))):
            return None  # a colour key marks transparent pixels: cv2 ignores it, PIL composites them
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
        if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
            return None  # PIL refuses it as a decompression bomb, as the folder import does
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # a damaged BMP/TIFF header past OpenCV's limits: PIL's path names what is wrong
        return None
    if array is None or array.dtype != np.uint8:
        return None
    if Image.MAX_IMAGE_PIXELS and array.shape[0] * array.shape[1] > 2 * Image.MAX_IMAGE_PIXELS:
        return None  # any format: PIL refuses it as a decompression bomb, as the folder import does
    if array.ndim == 2 and mode == "L":
        return array
    if array.ndim == 3 and array.shape[2] == 3 and mode == "RGB":
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return None  # palette/alpha/16-bit or a mode conversion: PIL's rules apply


def members_and_hint(sample: dict[str, bytes | str]) -> str:
    """The sample's members (a few), and why a member may be missing: file names with more dots than
    KEY.EXT (webdataset splits a name at its first dot), or one sample's files stored apart."""
    members = sorted(k for k in sample if not k.startswith("__"))
    shown = f"has {members[:5]}" + (f" and {len(members) - 5} more" if len(members) > 5 else "")
    dotted = [m for m in members if "." in m]
    if dotted:
        return (f"{shown}: webdataset splits a file name at its first dot, so '{sample['__key__']}.{dotted[0]}' "
                f"is read as that key's member '{dotted[0]}'; name the files KEY.EXT with no other dot")
    return (f"{shown} (if the member is elsewhere in the tar, this sample's files are not next to each other: "
            "write the tar with `tar --sort=name` or webdataset's TarWriter)")


def image_member(sample: dict[str, bytes | str], shard: ShardLocation,
                 image_keys: Sequence[str] = IMAGE_KEYS) -> str:
    """The one member of `image_keys` the sample holds; none, or two (which one is the image?), is an error."""
    key = sample["__key__"]
    present = [e for e in image_keys if e in sample]
    if not present:
        raise ShardError(f"shard {shard}, key '{key}': no image member ({'/'.join('.' + e for e in image_keys)}); "
                         f"{members_and_hint(sample)}")
    if len(present) > 1:
        raise ShardError(f"shard {shard}, key '{key}': {len(present)} image members ({', '.join(present)}); "
                         "a sample holds one image")
    return present[0]


def decode_image(sample: dict[str, bytes | str], shard: ShardLocation, mode: str,
                 image_keys: Sequence[str] = IMAGE_KEYS) -> np.ndarray:
    """Decode the image of a raw sample to uint8 HxWxC in `mode` ("L" or "RGB")."""
    key = sample["__key__"]
    ext = image_member(sample, shard, image_keys)
    try:
        return decode_bytes(sample[ext], mode)
    except Exception as exc:  # PIL raises many types for undecodable bytes
        raise ShardError(f"shard {shard}, key '{key}': image does not decode ({type(exc).__name__}: {exc})") from exc


def decode_bytes(data: bytes, mode: str) -> np.ndarray:
    """Encoded image bytes to uint8 HxWxC in `mode` ("L" or "RGB"), the one decoding every stage and
    `selftrain predict` share (EXIF orientation is not applied, by either decoder)."""
    array = _decode_fast(data, mode)
    if array is None:
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:  # its own message names a BytesIO object, not the file
            raise UnidentifiedImageError("not an image format Pillow reads") from None
        with image:
            array = np.asarray(to_8bit_opaque(image).convert(mode), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


ALPHA_BACKGROUND = (0, 0, 0)  # transparent pixels become black, the background of Fashion-MNIST-like data


def to_8bit_opaque(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (value / 257; PIL's convert would clip it to white), and an
    image with transparency composited over ALPHA_BACKGROUND (its hidden RGB must not show through)."""
    if image.mode == "F":
        raise ValueError("32-bit float pixels (mode F): their range (0..1 or 0..255) is not in the file; "
                         "save the image with 8- or 16-bit integer pixels")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.int64)
        return Image.fromarray(((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def label_value(sample: dict[str, bytes | str], shard: ShardLocation, label_key: str = "cls") -> object:
    """The raw label of a sample: the `cls` member's text, or a field of its `json` member
    (label_key "json:<field>")."""
    key = sample["__key__"]
    if label_key == "cls":
        if "cls" not in sample:
            raise ShardError(f"shard {shard}, key '{key}': missing 'cls' (the class index) in a labeled shard; "
                             f"{_label_elsewhere(sample) or members_and_hint(sample)}")
        raw = sample["cls"]
        try:
            return raw.decode().strip() if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            raise ShardError(f"shard {shard}, key '{key}': 'cls' is not text: {raw[:20]!r}") from None
    field_name = label_key.removeprefix("json:")
    if "json" not in sample:
        raise ShardError(f"shard {shard}, key '{key}': missing 'json' (label_key {label_key}) in a labeled shard")
    try:
        document = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"shard {shard}, key '{key}': the 'json' member is not JSON ({exc})") from None
    if not isinstance(document, dict) or field_name not in document:
        raise ShardError(f"shard {shard}, key '{key}': the 'json' member has no field '{field_name}' "
                         f"(label_key {label_key})")
    return document[field_name]


LABEL_LIKE_MEMBERS = ("txt", "label", "labels", "class", "target")


def _label_elsewhere(sample: dict[str, bytes | str]) -> str | None:
    """Where a sample without `cls` may keep its label: a `json` field (label_key), or a member to rename."""
    if "json" in sample:
        return ("it has a 'json' member: a label in one of its fields is read with data.webdataset.label_key: "
                "json:<field>")
    found = [m for m in LABEL_LIKE_MEMBERS if m in sample]
    if found:
        return (f"it has a '{found[0]}' member: labels are read from '.cls' (or a JSON field), so write the shards "
                f"with KEY.cls instead of KEY.{found[0]}")
    return None


def class_index(value: object, classes: Sequence[str] | None = None) -> int | None:
    """An integer, integer text, or (given the class names) a class name -> its index; else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.removeprefix("-").isdecimal():  # what int() reads ('²' is a digit int() refuses)
            return int(text)
        if classes is not None and text in classes:
            return list(classes).index(text)
    return None


def decode_label(sample: dict[str, bytes | str], shard: ShardLocation, num_classes: int,
                 label_key: str = "cls", classes: Sequence[str] | None = None) -> int:
    """The class index of a labeled sample (`label_key`: "cls" or "json:<field>"; names need `classes`)."""
    key = sample["__key__"]
    value = label_value(sample, shard, label_key)
    label = class_index(value, classes)
    what = "'cls'" if label_key == "cls" else f"'{label_key}'"
    if label is None:
        kind = "an integer or a class name" if classes is not None else "an integer (class names need a class list)"
        raise ShardError(f"shard {shard}, key '{key}': {what} is not {kind}: {str(value)[:40]!r}")
    if not 0 <= label < num_classes and classes is not None and str(value).strip() in classes:
        label = list(classes).index(str(value).strip())  # a number-like name ('10' of '10', '20', '30')
    if not 0 <= label < num_classes:
        raise ShardError(f"shard {shard}, key '{key}': class {label} is outside 0..{num_classes - 1}")
    return label
