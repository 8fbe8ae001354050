"""A folder of images with one sub-folder per class (PNG/JPEG, RGB or grayscale, any size)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.data.sources.fashion_mnist import DataSourceError

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True)
class FolderImage:
    path: Path
    label: int
    key: str


def _safe(text: str) -> str:
    """webdataset keys may not contain dots; keep them readable and stable."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def is_hidden(path: Path, root: Path) -> bool:
    """A dot-file or anything under a dot-folder below `root` (.DS_Store, macOS ._ files, .ipynb_checkpoints
    copies): never an image of the data set."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def class_names(root: Path) -> list[str]:
    """An image folder's classes: its sub-folders (not hidden), sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def walk_files(root: Path) -> list[Path]:
    """Every file under `root` that is not hidden, sorted; linked folders are followed once (a link back up
    the tree is not looped over), and a dangling link is listed so that callers name it."""
    found, seen = [], set()
    for directory, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        for name in names:
            path = Path(directory) / name
            if (path.is_file() or path.is_symlink() and not path.exists()) and not is_hidden(path, root):
                found.append(path)
    return sorted(found)


def scan(root: str | Path) -> tuple[list[str], list[FolderImage], list[Path]]:
    """Class names (sorted sub-folder names), every image in a stable order, and the other files found
    (not hidden; in class folders not PNG/JPEG/WebP or a dangling link, or beside the class folders: skipped,
    and reported by the importer)."""
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f"image folder {root} does not exist or is not a directory")
    classes = class_names(root)
    if len(classes) < 2:
        raise DataSourceError(f"image folder {root}: need one sub-folder per class (at least 2), found {classes}")
    images: list[FolderImage] = []
    # files beside the class folders belong to no class: named with the skipped ones, not dropped unseen
    others: list[Path] = sorted(p for p in root.iterdir() if not p.is_dir() and not p.name.startswith("."))
    used: set[str] = set()
    for label, name in enumerate(classes):
        found = walk_files(root / name)
        files = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.exists()]
        others += [p for p in found if p.suffix.lower() not in IMAGE_SUFFIXES or not p.exists()]
        if not files:
            kinds = sorted({p.suffix.lower() or p.name for p in found})
            raise DataSourceError(f"image folder {root}: class folder '{name}' has no PNG/JPEG/WebP images"
                                  + (f" (it holds {', '.join(kinds[:5])} files; convert them to PNG)" if kinds else ""))
        for path in files:
            key = f"{_safe(name)}__{_safe(str(path.relative_to(root / name).with_suffix('')))}"
            base, n = key, 1
            while key in used:
                n += 1
                key = f"{base}_{n}"
            used.add(key)
            images.append(FolderImage(path, label, key))
    return classes, images, others


def listing_digest(images: list[FolderImage]) -> str:
    """sha256 of every image's key and byte size: a folder whose images were replaced, renamed or edited
    reads as changed without decoding anything (an edit that keeps the byte size exactly is not seen)."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.key}\t{image.path.stat().st_size}\n".encode())
    return digest.hexdigest()


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
ALPHA_MODES = ("RGBA", "LA", "PA")
EXIF_ORIENTATION = 0x0112  # phone photos: stored sideways, shown upright by viewers


def header_mode(image: FolderImage) -> str:
    """'L' or 'RGB' from the file header alone (cheap); a folder with any colour image is stored as RGB."""
    return header_info(image)[0]


def header_info(image: FolderImage) -> tuple[str, str | None]:
    """('L' or 'RGB', what decoding does that a viewer would not: "16-bit scaled", "alpha composited",
    "EXIF orientation not applied" (training and predict use the stored pixels, as torchvision and timm
    loaders do) or None), from the file header alone."""
    try:
        with Image.open(image.path) as handle:
            mode = "L" if handle.mode in GRAY_MODES else "RGB"
            if handle.mode in SIXTEEN_BIT_MODES:
                return mode, "16-bit scaled"
            # the decoder's own test (shards.to_8bit_opaque): a grey or RGB PNG with a transparent colour (tRNS)
            # is composited too, and was not counted
            if handle.mode in ALPHA_MODES or (handle.mode in ("P", "L", "RGB") and "transparency" in handle.info):
                return mode, "alpha composited"
            if handle.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return mode, "EXIF orientation not applied"
            return mode, None
    except Exception as exc:  # PIL raises many types
        raise DataSourceError(f"{image.path}: not a readable image ({type(exc).__name__}: {exc})") from None


def read_checked(image: FolderImage) -> tuple[str, bytes]:
    """Original bytes (no re-encoding) and their extension; fails loudly if the image does not decode."""
    data = image.path.read_bytes()
    try:
        with Image.open(image.path) as handle:
            handle.load()
    except Exception as exc:  # PIL raises many types
        raise DataSourceError(f"{image.path}: image does not decode ({type(exc).__name__}: {exc})") from None
    return IMAGE_SUFFIXES[image.path.suffix.lower()], data
