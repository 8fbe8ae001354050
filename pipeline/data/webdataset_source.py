"""Shards written by other tools, used in place (`data.source: webdataset`): a manifest, nothing copied.

Each split's URL list is expanded as `webdataset.WebDataset` expands it (braces, `WDS_` variables)
and every shard is streamed once, through the same reader and sample grouping later stages use.
`manifest.json` (the only file kept; `scan.jsonl` lists the shards scanned so far while it runs, so
a killed import resumes shard by shard) records per shard its URL, its name (the basename: what
sidecars and plans are keyed by, so two shards of one split with one name are refused), its
sample count, size and sha256 of the bytes streamed; then the classes, per-class counts and the
image mode ("RGB" if any labeled image is in colour). Labeled splits are read strictly: a sample
without exactly one image member or a readable label is an error naming shard and key. The
unlabeled pool is skip-and-count, as pseudo-labeling reads it; its count is of usable samples.
"""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image
from webdataset.gopen import gopen_schemes
from webdataset.shardlists import expand_urls

from pipeline.config.schema import to_dict
from pipeline.config.sections import DataConfig, WebDatasetConfig
from pipeline.core.atomic import write_json
from pipeline.core.bars import progress_bar
from pipeline.core.owned import claim
from pipeline.config.presets import PRESET_CAP_NOTE
from pipeline.core.stage_files import shard_stem
from pipeline.data.importer import FORMAT, MANIFEST, RUN_BOOKKEEPING, existing_import
from pipeline.data.scan_journal import SCAN_JOURNAL, ScanJournal
from pipeline.data.shard_io import Fingerprint, ShardLocation, as_location, shard_basename
from pipeline.data.shards import (ReadProblems, ShardError, class_index, decode_label, image_member, iter_shard,
                                  label_value)
from pipeline.data.sources.fashion_mnist import DataSourceError
from pipeline.data.sources.folder import GRAY_MODES

LABELED_SPLITS = ("labeled", "holdout", "test")
REQUIRED_SPLITS = ("labeled", "unlabeled", "test")
SPLITS = LABELED_SPLITS + ("unlabeled",)  # scan order: labels (and the class count) first


def webdataset_section(data: DataConfig) -> WebDatasetConfig:
    """The `data.webdataset` section of a `source: webdataset` config; settings it cannot honour are refused."""
    if data.webdataset is None:
        raise DataSourceError("data.source is 'webdataset' but data.webdataset (shard URL lists for labeled, "
                              "unlabeled and test) is not set")
    if data.classes or data.out_of_domain_unlabeled:
        raise DataSourceError("data.classes and data.out_of_domain_unlabeled filter an import; shards used in place "
                              "keep their own classes (their names go in data.webdataset.classes)")
    if data.max_unlabeled is not None:
        raise DataSourceError(f"data.max_unlabeled is {data.max_unlabeled}, and shards used in place are used whole; "
                              f"list fewer unlabeled shards, or --set data.max_unlabeled=null ({PRESET_CAP_NOTE})")
    return data.webdataset


def _check_url(url: str, split: str) -> ShardLocation:
    location = as_location(url)
    if isinstance(location, Path):
        if not location.is_file():
            raise DataSourceError(f"data.webdataset.{split}: shard {url} does not exist")
        return location
    scheme = urlparse(url).scheme
    if scheme not in gopen_schemes:
        known = ", ".join(sorted(s for s in gopen_schemes if not s.startswith("_")))
        raise DataSourceError(f"data.webdataset.{split}: {url}: webdataset.gopen cannot open '{scheme}:' URLs "
                              f"(it opens local paths, file:, {known}); e.g. pipe:aws s3 cp s3://BUCKET/x.tar -")
    return location


def shard_lists(cfg: WebDatasetConfig) -> dict[str, list[tuple[str, ShardLocation]]]:
    """(name, location) of every shard of each split, checked before anything streams: required splits
    are not empty, URL schemes are known, local files exist, no two shards of a split share a name."""
    lists: dict[str, list[tuple[str, ShardLocation]]] = {}
    for split in SPLITS:
        named: dict[str, tuple[str, str, ShardLocation]] = {}  # by sidecar stem: (url, name, location)
        for url in (u for entry in getattr(cfg, split) for u in expand_urls(entry)):
            location = _check_url(url, split)
            name = shard_basename(location)
            if not name:
                raise DataSourceError(f"data.webdataset.{split}: cannot tell the shard's file name from {url!r} "
                                      "(sidecars are keyed by it); name the .tar file in the URL or command")
            if shard_stem(name) in named:
                first_url, first_name, _ = named[shard_stem(name)]
                what = (f"are named {name}" if first_name == name
                        else f"named {first_name} and {name} share the sidecar name {shard_stem(name)}")
                raise DataSourceError(f"data.webdataset.{split}: two shards {what}: {first_url} and {url}; sidecars "
                                      "and plans are keyed by the file name without .tar, rename one")
            named[shard_stem(name)] = (url, name, location)
        if not named and split in REQUIRED_SPLITS:
            raise DataSourceError(f"data.webdataset.{split}: no shards; list the {split} split's shard URLs")
        lists[split] = [(name, location) for _, name, location in named.values()]
    _refuse_shared_shards({split: {_stored_url(location): _stored_url(location) for _, location in shards}
                           for split, shards in lists.items()}, "listed")
    return lists


EVALUATION_SPLITS = ("test", "holdout")  # a shard of these in another split leaks what they measure


def _refuse_shared_shards(by_split: dict[str, dict[str, str]], how: str) -> None:
    """A test or holdout shard (its URL, or its sha256 once read) that is also in another split is refused:
    the model would train (or be tuned) on the images it is measured with. `by_split`: per split, the value
    compared -> the shard's URL, which the message names in both splits."""
    for split in EVALUATION_SPLITS:
        for other, values in by_split.items():
            shared = sorted(set(by_split.get(split, {})) & set(values)) if other != split else []
            if shared:
                first = shared[0]
                where = (first if by_split[split][first] == values[first] == first else
                         f"{by_split[split][first]} in {split} and {values[first]} in {other}")
                raise DataSourceError(f"data.webdataset: {len(shared)} shard(s) {how} in both {split} and {other} "
                                      f"({where}{', ...' if len(shared) > 1 else ''}); the {split} split must "
                                      "hold images no other split has")


def _refuse_empty_classes(per_class: list[int]) -> None:
    """Without `classes`, the classes are 0..the largest label: one with no labeled image is a stray or a
    1-based label, not a class to learn."""
    empty = [str(i) for i, count in enumerate(per_class) if count == 0]
    if empty:
        raise DataSourceError(f"data.webdataset: the labels found run 0..{len(per_class) - 1}, and class(es) "
                              f"{', '.join(empty[:8])}{', ...' if len(empty) > 8 else ''} have no labeled image; "
                              "labels are class indices 0..N-1 (1-based labels, or one stray label, make empty "
                              "classes): relabel, or name the classes in data.webdataset.classes (then a class "
                              "may have no labeled image)")


def read_classes(cfg: WebDatasetConfig) -> list[str] | None:
    """Class names from `classes` or `classes_file` (one per line); None when neither is given."""
    if cfg.classes_file is not None:
        try:
            text = Path(cfg.classes_file).read_text(encoding="utf-8-sig")  # a byte-order mark is not a name
        except OSError as exc:
            raise DataSourceError(f"data.webdataset.classes_file: cannot read {cfg.classes_file} "
                                  f"({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise DataSourceError(f"data.webdataset.classes_file: {cfg.classes_file} is not UTF-8 text "
                                  f"({exc.reason} at byte {exc.start})") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        where = cfg.classes_file
    elif cfg.classes is not None:
        names, where = list(cfg.classes), "data.webdataset.classes"
    else:
        return None
    repeated = sorted({n for n in names if names.count(n) > 1})
    if len(names) < 2 or repeated:
        raise DataSourceError(f"{where}: need at least 2 distinct class names"
                              + (f"; repeated: {repeated}" if repeated else f", got {names}"))
    clashes = [(n, i) for i, n in enumerate(names) if n.isdecimal() and int(n) != i and int(n) < len(names)]
    if clashes:
        name, position = clashes[0]
        raise DataSourceError(f"{where}: the class name '{name}' (position {position}) is also the class index "
                              f"{name}, so a label '{name}' could mean either; relabel the shards with the indices "
                              f"0..{len(names) - 1} or with names that are not numbers")
    return names


def _stored_url(location: ShardLocation) -> str:
    """What later stages open: an absolute path for a local file, else the URL as given."""
    return str(location.absolute()) if isinstance(location, Path) else location


def _decoded_mode(sample: dict, member: str, location: ShardLocation) -> str:
    """'L' or 'RGB' of an image decoded in full (a JPEG at 1/8 scale, which still reads its whole
    stream): a damaged labeled image is refused by the data stage, not after the teacher has trained."""
    try:
        with Image.open(io.BytesIO(sample[member])) as image:
            image.draft(image.mode, (1, 1))  # JPEG only; other formats ignore it
            image.load()
            return "L" if image.mode in GRAY_MODES else "RGB"
    except Exception as exc:  # PIL raises many types
        raise ShardError(f"shard {location}, key '{sample['__key__']}': image does not decode "
                         f"({type(exc).__name__}: {exc})") from None


def _label(sample: dict, location: ShardLocation, cfg: WebDatasetConfig, classes: list[str] | None) -> int:
    if classes is not None:
        return decode_label(sample, location, len(classes), cfg.label_key, classes)
    value = label_value(sample, location, cfg.label_key)
    label = class_index(value)
    if label is None or label < 0:
        raise ShardError(f"shard {location}, key '{sample['__key__']}': label {str(value)[:40]!r} is not a class "
                         "index; class names need data.webdataset.classes (or classes_file)")
    return label


def _record(name: str, location: ShardLocation, count: int, fingerprint: Fingerprint) -> dict:
    return {"name": name, "url": _stored_url(location), "count": count, "size": fingerprint.size,
            "sha256": fingerprint.sha256}


def scan_labeled(name: str, location: ShardLocation, cfg: WebDatasetConfig, classes: list[str] | None) -> dict:
    """A labeled shard, read strictly: {"record", "labels", "modes" (the image modes found)}."""
    fingerprint = Fingerprint()
    labels, modes = [], set()
    for sample in iter_shard(location, on_error="raise", fingerprint=fingerprint):
        modes.add(_decoded_mode(sample, image_member(sample, location, cfg.image_keys), location))
        labels.append(_label(sample, location, cfg, classes))
    return {"record": _record(name, location, len(labels), fingerprint), "labels": labels, "modes": sorted(modes)}


def scan_unlabeled(name: str, location: ShardLocation, cfg: WebDatasetConfig) -> dict:
    """An unlabeled shard: {"record", "skipped", "truncated"}; samples without one image member or under a
    repeated key are skipped, listed and not in the record's count."""
    problems = ReadProblems()
    fingerprint = Fingerprint()
    seen: set[str] = set()
    for sample in iter_shard(location, on_error="skip", problems=problems, fingerprint=fingerprint):
        key = str(sample["__key__"])
        try:
            if key in seen:
                raise ShardError(f"duplicate __key__ in shard {name} (the first is kept)")
            image_member(sample, location, cfg.image_keys)
        except ShardError as exc:
            problems.skipped.append({"shard": name, "key": key, "reason": str(exc)})
            continue
        seen.add(key)
    return {"record": _record(name, location, len(seen), fingerprint), "skipped": problems.skipped,
            "truncated": problems.truncated}


def _scan(lists: dict[str, list[tuple[str, ShardLocation]]], cfg: WebDatasetConfig, classes: list[str] | None,
          journal: ScanJournal, progress: bool) -> tuple[dict[str, list[dict]], dict[str, list[int]], set[str],
                                                         ReadProblems]:
    """Every shard's record (read now, or taken from the journal), the labels, image modes and pool problems."""
    records: dict[str, list[dict]] = {}
    labels: dict[str, list[int]] = {}
    modes: set[str] = set()
    problems = ReadProblems()
    total = sum(len(v) for v in lists.values())
    reused = 0
    with progress_bar(total=total, desc="scan shards", unit="shard", disable=not progress) as bar:
        for split in SPLITS:
            records[split], labels[split] = [], []
            for name, location in lists[split]:
                url = _stored_url(location)
                scan = journal.scanned(split, url, location)
                reused += scan is not None
                if scan is None:
                    scan = (scan_unlabeled(name, location, cfg) if split == "unlabeled"
                            else scan_labeled(name, location, cfg, classes))
                    journal.add(split, url, location, scan)
                records[split].append(scan["record"])
                labels[split] += scan.get("labels", [])
                modes.update(scan.get("modes", []))
                problems.skipped += scan.get("skipped", [])
                problems.truncated += scan.get("truncated", [])
                bar.update(1)
    if reused:
        print(f"data: {reused} of {total} shard(s) were scanned before the last run stopped; not read again")
    return records, labels, modes, problems


def _scanned_manifest(cfg: WebDatasetConfig, params: dict, lists: dict[str, list[tuple[str, ShardLocation]]],
                      classes: list[str] | None, journal: ScanJournal, progress: bool) -> dict:
    records, labels, modes, problems = _scan(lists, cfg, classes, journal, progress)
    for split in ("labeled", "holdout", "test"):
        if records[split] and not any(r["count"] for r in records[split]):
            raise DataSourceError(f"data.webdataset.{split}: no samples in its {len(records[split])} shard(s) "
                                  f"({', '.join(r['name'] for r in records[split][:3])}); the {split} split "
                                  f"{'is optional: leave it out' if split == 'holdout' else 'needs images'}")
    _refuse_shared_shards({split: {r["sha256"]: str(r.get("url", r["name"])) for r in records[split] if r["count"]}
                           for split in records}, "with the same bytes (sha256)")
    if classes is None:
        top = max((max(v) for v in labels.values() if v), default=0)
        if top < 1:
            raise DataSourceError("data.webdataset: the labeled splits hold a single class (0); need at least 2")
        _refuse_empty_classes(np.bincount(labels["labeled"], minlength=top + 1).tolist())
        classes = [str(i) for i in range(top + 1)]
    if not any(r["count"] for r in records["unlabeled"]):
        raise DataSourceError(f"data.webdataset.unlabeled: no usable sample in {len(records['unlabeled'])} shard(s) "
                              f"({len(problems.skipped)} skipped, {len(problems.truncated)} truncated)")
    return {
        "format": FORMAT, "params": params, "source": "webdataset (shards used in place)",
        "classes": classes, "num_classes": len(classes), "mode": "RGB" if "RGB" in modes else "L",
        "image_keys": list(cfg.image_keys), "label_key": cfg.label_key,
        "splits": {split: {"count": sum(int(r["count"]) for r in records[split]),
                           "per_class": (np.bincount(labels[split], minlength=len(classes)).tolist()
                                         if split != "unlabeled" else None),
                           "shards": records[split]}
                   for split in ("labeled", "holdout", "unlabeled", "test")},
        "unlabeled_problems": problems.as_dict(),
    }


def import_webdataset(data: DataConfig, out: Path, progress: bool = True) -> dict:
    """Write `out`/manifest.json for the shards `data.webdataset` lists (or return the one already there)."""
    cfg = webdataset_section(data)
    params = {"kind": "webdataset", "webdataset": to_dict(cfg)}
    if (manifest := existing_import(out, params)) is not None:
        return manifest
    lists = shard_lists(cfg)
    classes = read_classes(cfg)
    journal = ScanJournal(out, params)  # what a killed scan finished, read before claim removes its file
    claim(out, [SCAN_JOURNAL, MANIFEST], tolerated=RUN_BOOKKEEPING)
    journal.start()
    try:
        manifest = _scanned_manifest(cfg, params, lists, classes, journal, progress)
    except (DataSourceError, ShardError):
        journal.forget_streams()  # refused: the user fixes the shards; a stream's URL cannot tell it changed
        raise
    finally:
        journal.close()
    problems = manifest["unlabeled_problems"]
    if problems["num_skipped"] or problems["num_truncated"]:
        print(f"data: unlabeled pool: {problems['num_skipped']} sample(s) skipped, {problems['num_truncated']} "
              f"shard(s) truncated (see unlabeled_problems in {out / MANIFEST})")
    write_json(out / MANIFEST, manifest)
    journal.finish()
    return manifest
