"""Data import: a raw source -> labeled/holdout/unlabeled/test shards + manifest.

The split is a pure function of (labels, seed, sizes), so the same seed gives
the same shards byte for byte. `manifest.json` is written last: a directory
without it is an incomplete import and is redone from scratch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.core.atomic import read_json, sha256_file, write_json
from pipeline.core.bars import progress_bar
from pipeline.core.owned import claim, refuse_foreign
from pipeline.data.shards import ALPHA_BACKGROUND, encode_png, shard_name, write_shards
from pipeline.data.sources import fashion_mnist, folder
from pipeline.data.sources.fashion_mnist import DataSourceError

SPLITS = ("labeled", "holdout", "unlabeled", "test")
MANIFEST = "manifest.json"
TRUTH_FILE = "unlabeled_truth.json"
FORMAT = "selftrain-data/1"
# files of the run directory's stage protocol that may sit beside an import (RUN/data); never removed here
RUN_BOOKKEEPING = ("stage.json", "DONE", "wall_time.json", "failed.json")


@dataclass(frozen=True)
class ClassFilter:
    """Keep some classes, renumbered 0..k-1 in the order given; optionally the other classes'
    training images join the unlabeled pool without labels (out-of-domain data, as ImageNet
    was for COCO in Zoph et al. 2020). Their hidden truth is not recorded: they have no target class."""

    keep: tuple[str, ...]  # class names, or their indices as text ("5")
    out_of_domain_unlabeled: bool = False

    def resolve(self, names: list[str]) -> list[int]:
        """The kept classes' original indices; unknown or repeated names are refused, naming them. A class name
        wins over an index: folders named 1..10 sort as 1, 10, 2, ..., and `--classes 1,2` meant folders 1
        and 2, not the second and third (it took '10' and '2' without a word)."""
        chosen = []
        for item in self.keep:
            if item in names:
                index: int | None = names.index(item)
            else:
                index = int(item) if str(item).isdecimal() else None
            if index is None or not 0 <= index < len(names):
                raise DataSourceError(f"data.classes: unknown class {item!r}; the source has {names} "
                                      f"(names or indices 0..{len(names) - 1})")
            if index in chosen:
                raise DataSourceError(f"data.classes: class {item!r} is listed twice")
            chosen.append(index)
        if len(chosen) < 2:
            raise DataSourceError(f"data.classes: keep at least 2 classes, got {list(self.keep)}")
        return chosen

    def apply(self, labels: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
        """Labels renumbered (-1 for every other class) and the kept class names."""
        chosen = self.resolve(names)
        mapping = np.full(len(names), -1, dtype=np.int64)
        mapping[chosen] = np.arange(len(chosen))
        return mapping[labels], [names[i] for i in chosen]

    def params(self, names: list[str]) -> dict[str, object]:
        return {"classes": [names[i] for i in self.resolve(names)],
                "out_of_domain_unlabeled": self.out_of_domain_unlabeled}


def split_labeled(labels: np.ndarray, per_class: int, holdout_per_class: int,
                  seed: int, classes: list[str], max_unlabeled: int | None = None,
                  out_of_domain: bool = False) -> dict[str, np.ndarray]:
    """Pick `per_class` human labels per class (seeded); `holdout_per_class` of them are held out.

    Returns sorted index arrays for "labeled", "holdout" and "unlabeled" (the rest, or a
    seeded subset of `max_unlabeled` of it). Label -1 marks a filtered-out class: such images
    join the unlabeled pool only with `out_of_domain`.
    """
    if holdout_per_class >= per_class:
        raise DataSourceError(f"holdout_per_class ({holdout_per_class}) must be smaller than labels_per_class ({per_class})")
    rng = np.random.default_rng(seed)
    labeled, holdout = [], []
    for c in range(len(classes)):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise DataSourceError(f"class '{classes[c]}' has {len(members)} training images; "
                                  f"labels_per_class={per_class} must leave some unlabeled")
        chosen = rng.permutation(members)[:per_class]
        holdout.append(chosen[per_class - holdout_per_class:])
        labeled.append(chosen[:per_class - holdout_per_class])
    labeled_idx = np.sort(np.concatenate(labeled))
    holdout_idx = np.sort(np.concatenate(holdout))
    rest = np.ones(len(labels), dtype=bool)
    rest[labeled_idx] = False
    rest[holdout_idx] = False
    if not out_of_domain:
        rest[labels < 0] = False  # images of classes that were filtered out
    unlabeled = np.flatnonzero(rest)
    if max_unlabeled is not None and max_unlabeled < len(unlabeled):
        unlabeled = np.sort(rng.choice(unlabeled, size=max_unlabeled, replace=False))
    return {"labeled": labeled_idx, "holdout": holdout_idx, "unlabeled": unlabeled}


def import_params(kind: str, per_class: int, holdout: int, seed: int, shard_size: int,
                  test_fraction: float | None = None, max_unlabeled: int | None = None) -> dict[str, object]:
    """What the import's result depends on (not where the raw files were found); values are checked here,
    for the command line and the config alike."""
    checks = [("labels_per_class", per_class, per_class >= 1, "at least 1"),
              ("holdout_per_class", holdout, holdout >= 0, "at least 0"),
              ("seed", seed, seed >= 0, "at least 0"),
              ("shard_size", shard_size, shard_size >= 1, "at least 1"),
              ("max_unlabeled", max_unlabeled, max_unlabeled is None or max_unlabeled >= 1,
               "at least 1 (an empty unlabeled pool leaves nothing to self-train on)"),
              ("test_fraction", test_fraction, test_fraction is None or 0 < test_fraction < 1,
               "between 0 and 1, exclusive")]
    for name, value, ok, rule in checks:
        if not ok:
            raise DataSourceError(f"{name} (--{name.replace('_', '-')} / data.{name}) must be {rule}, got {value}")
    params: dict[str, object] = {"kind": kind, "labels_per_class": per_class, "holdout_per_class": holdout,
                                 "seed": seed, "shard_size": shard_size}
    if max_unlabeled is not None:
        params["max_unlabeled"] = max_unlabeled
    if test_fraction is not None:
        params["test_fraction"] = test_fraction
    return params


def existing_import(out: Path, params: dict[str, object]) -> dict | None:
    """The manifest if `out` already holds this exact import; raise if it holds another one."""
    path = out / MANIFEST
    if not path.exists():
        refuse_foreign(out, RUN_BOOKKEEPING)  # before any work: the import would write here
        return None
    manifest = read_json(path)
    if manifest.get("params") != params:
        diff = {k: (manifest.get("params", {}).get(k), v) for k, v in params.items()
                if manifest.get("params", {}).get(k) != v}
        raise DataSourceError(f"{out} already holds a different import ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                              "choose another --out or delete it")
    return manifest


NEW_IMPORT_ADVICE = "choose another --out or delete it to import the folder as it is now"


def check_same_folder(out: Path, manifest: dict, src: str | Path, images: list, whole: bool,
                      advice: str = NEW_IMPORT_ADVICE) -> None:
    """An import of another image folder, or of this one since changed, is refused (with `advice`): returning
    the old import would silently drop or keep stale images. `whole`: every image is imported (no filter or
    cap), so the count can be compared as well as the listing."""
    made_from = Path(manifest.get("source", ""))
    # imports made before sources were recorded resolved hold the path as typed: not comparable from here
    if made_from.is_absolute() and made_from != Path(src).resolve():
        raise DataSourceError(f"{out} already holds an import of the image folder {made_from}, not {src}; {advice}")
    imported = sum(split["count"] for split in manifest["splits"].values())
    if whole and len(images) != imported:
        raise DataSourceError(f"{out} holds {imported} images imported from {src}, which now holds {len(images)}; "
                              f"{advice}")
    recorded = manifest.get("listing", {}).get("sha256")  # absent in imports made before it was recorded
    if recorded is not None and recorded != folder.listing_digest(images):
        raise DataSourceError(f"{out} holds an import of {src}, whose images have changed since (same count; files "
                              f"replaced, renamed or edited); {advice}")


def _write_splits(out: Path, split_items: dict[str, list[tuple[str, int, Callable[[], tuple[str, bytes]]]]],
                  shard_size: int, progress: bool) -> dict[str, list[dict[str, object]]]:
    total = sum(len(items) for items in split_items.values())
    bar = progress_bar(total=total, desc="import", unit="img", disable=not progress)
    records = {}
    with bar:  # closed before an error message is printed
        for split, items in split_items.items():
            def samples() -> Iterator[dict[str, bytes | str]]:
                for key, label, payload in items:
                    ext, data = payload()
                    bar.update(1)
                    sample: dict[str, bytes | str] = {"__key__": key, ext: data}
                    if label >= 0:  # the unlabeled pool carries no labels at all
                        sample["cls"] = str(label).encode()
                    yield sample
            records[split] = write_shards(out / split, split, samples(), shard_size) if items else []
    return records


def planned_files(split_items: dict[str, list], shard_size: int) -> list[str]:
    """Every path (relative to the output directory) the import will write."""
    shards = [f"{split}/{shard_name(split, i)}" for split, items in split_items.items()
              for i in range(math.ceil(len(items) / shard_size))]
    return shards + [TRUTH_FILE, MANIFEST]


def conversion_counts(images: list, headers: list[tuple[str, str | None]]) -> dict:
    """How many images decoding converts (16-bit scaled to 8 bits, alpha composited on black), with
    examples: recorded in the manifest and printed, never silent."""
    found: dict = {"alpha_background": list(ALPHA_BACKGROUND)}
    detail = {"16-bit scaled": " to 8 bits (value / 257)", "alpha composited": " on black",
              "EXIF orientation not applied": " (used as stored, as torchvision and timm loaders do; rotate the "
                                              "files themselves to train on them upright)"}
    for kind, said in detail.items():
        paths = [str(im.path) for im, (_, conversion) in zip(images, headers) if conversion == kind]
        found[kind] = {"count": len(paths), "examples": paths[:5]}
        if paths:
            print(f"import: {len(paths)} image(s) {kind}{said}, e.g. {paths[0]}")
    return found


def _finish(out: Path, params: dict[str, object], classes: list[str], mode: str,
            split_items: dict[str, list], shard_size: int, truth: dict[str, int], source: str,
            progress: bool, extra: dict | None = None) -> dict:
    claim(out, planned_files(split_items, shard_size), tolerated=RUN_BOOKKEEPING)
    records = _write_splits(out, split_items, shard_size, progress)
    write_json(out / TRUTH_FILE, truth)
    manifest = {
        "format": FORMAT, "params": params, "source": source,
        "classes": classes, "num_classes": len(classes), "mode": mode,
        "splits": {split: {"count": len(items),
                           "per_class": np.bincount([label for _, label, _ in items], minlength=len(classes)).tolist()
                           if split != "unlabeled" else None,
                           "shards": records[split]}
                   for split, items in split_items.items()},
        "unlabeled_truth": {"file": TRUTH_FILE, "sha256": sha256_file(out / TRUTH_FILE),
                            "note": "true labels of the unlabeled pool; only for measuring pseudo-label accuracy"},
        **(extra or {}),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def import_fashion_mnist(out: str | Path, source: str | None = None, per_class: int = 100,
                         holdout_per_class: int = 0, seed: int = 0, shard_size: int = 5000,
                         progress: bool = True, max_unlabeled: int | None = None,
                         class_filter: ClassFilter | None = None) -> dict:
    out = Path(out)
    classes = list(fashion_mnist.CLASS_NAMES)
    params = import_params("fashion-mnist", per_class, holdout_per_class, seed, shard_size,
                           max_unlabeled=max_unlabeled)
    if class_filter is not None:
        params.update(class_filter.params(classes))
    if (manifest := existing_import(out, params)) is not None:
        return manifest
    arrays = fashion_mnist.load(source)
    train_x, train_y = arrays["train_images"], arrays["train_labels"].astype(np.int64)
    test_x, test_y = arrays["test_images"], arrays["test_labels"].astype(np.int64)
    if class_filter is not None:
        train_y, _ = class_filter.apply(train_y, classes)
        test_y, classes = class_filter.apply(test_y, classes)
        test_x, test_y = test_x[test_y >= 0], test_y[test_y >= 0]
    parts = split_labeled(train_y, per_class, holdout_per_class, seed, classes, max_unlabeled,
                          out_of_domain=class_filter is not None and class_filter.out_of_domain_unlabeled)

    def items(x: np.ndarray, y: np.ndarray, prefix: str, idx: np.ndarray, keep_label: bool) -> list:
        return [(f"{prefix}-{i:05d}", int(y[i]) if keep_label else -1,
                 (lambda i=i: ("png", encode_png(x[i])))) for i in idx]

    split_items = {
        "labeled": items(train_x, train_y, "train", parts["labeled"], True),
        "holdout": items(train_x, train_y, "train", parts["holdout"], True),
        "unlabeled": items(train_x, train_y, "train", parts["unlabeled"], False),
        "test": items(test_x, test_y, "test", np.arange(len(test_y)), True),
    }
    truth = {f"train-{i:05d}": int(train_y[i]) for i in parts["unlabeled"] if train_y[i] >= 0}
    where = str(fashion_mnist.locate(source))
    return _finish(out, params, classes, "L", split_items, shard_size, truth, where, progress)


def import_folder(src: str | Path, out: str | Path, per_class: int = 100, holdout_per_class: int = 0,
                  seed: int = 0, shard_size: int = 5000, test_fraction: float = 0.2,
                  progress: bool = True, max_unlabeled: int | None = None,
                  class_filter: ClassFilter | None = None) -> dict:
    """Import an image folder; `test_fraction` of each class becomes the held-out test split."""
    out = Path(out)
    params = import_params("folder", per_class, holdout_per_class, seed, shard_size, test_fraction, max_unlabeled)
    classes, images, others = folder.scan(src)
    if others:
        print(f"import: {len(others)} file(s) are no class's PNG/JPEG/WebP image (another format, a dangling link, "
              f"or a file beside the class folders) and were skipped (e.g. {others[0]})")
    if class_filter is not None:
        params.update(class_filter.params(classes))
    if (manifest := existing_import(out, params)) is not None:
        check_same_folder(out, manifest, src, images, whole=class_filter is None and max_unlabeled is None)
        return manifest
    labels = np.array([im.label for im in images], dtype=np.int64)
    if class_filter is not None:
        labels, classes = class_filter.apply(labels, classes)
    rng = np.random.default_rng(seed + 1)  # independent of the labeled draw
    is_test = np.zeros(len(images), dtype=bool)
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(labels == c))
        is_test[members[:max(1, int(round(test_fraction * len(members))))]] = True
    train_idx = np.flatnonzero(~is_test)  # filtered-out classes (-1) are never test images
    parts = split_labeled(labels[train_idx], per_class, holdout_per_class, seed, classes, max_unlabeled,
                          out_of_domain=class_filter is not None and class_filter.out_of_domain_unlabeled)
    headers = [folder.header_info(im) for im in images]
    mode = "RGB" if any(m == "RGB" for m, _ in headers) else "L"
    conversions = conversion_counts(images, headers)

    def payload(i: int) -> Callable[[], tuple[str, bytes]]:
        return lambda: folder.read_checked(images[i])

    def items(idx: np.ndarray, keep_label: bool) -> list:
        return [(images[i].key, int(labels[i]) if keep_label else -1, payload(i)) for i in idx]

    split_items = {
        "labeled": items(train_idx[parts["labeled"]], True),
        "holdout": items(train_idx[parts["holdout"]], True),
        "unlabeled": items(train_idx[parts["unlabeled"]], False),
        "test": items(np.flatnonzero(is_test), True),
    }
    truth = {images[i].key: int(labels[i]) for i in train_idx[parts["unlabeled"]] if labels[i] >= 0}
    return _finish(out, params, classes, mode, split_items, shard_size, truth, str(Path(src).resolve()), progress,
                   extra={"conversions": conversions,
                          "skipped_files": {"count": len(others), "examples": [str(p) for p in others[:5]]},
                          "listing": {"sha256": folder.listing_digest(images), "of": "every image's key and byte size"}})


def refuse_output_inside_source(output: Path, source: Path, what: str) -> None:
    """An image folder's import never writes inside it: the output became a class folder of its own ("class
    folder 'runs' has no PNG/JPEG/WebP images"), a message about a folder the tool made."""
    output, source = output.resolve(), source.resolve()
    if output != source and source in output.parents:
        raise DataSourceError(f"{what} {output} is inside the image folder {source}, whose every sub-folder is "
                              "a class; put it outside (e.g. beside the image folder)")
