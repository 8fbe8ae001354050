"""Stage `data`: import the configured source into webdataset shards (or check an existing import).

Reads: Fashion-MNIST idx files, an image folder, an existing import (`data.source: shards`), or
shards written by other tools, used in place (`data.source: webdataset`: streamed once, not copied).
Writes: RUN/data/{labeled,holdout,unlabeled,test}/*.tar + manifest.json (written last), with the
files it writes journaled first (pipeline.core.owned), then DONE; for `webdataset` only manifest.json.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config.presets import PRESET_CAP_NOTE
from pipeline.config.schema import to_dict
from pipeline.core.atomic import sha256_file
from pipeline.core.rundir import RunDirError
from pipeline.data.imageset import open_data
from pipeline.config.sections import DataConfig
from pipeline.data.importer import ClassFilter, import_fashion_mnist, import_folder
from pipeline.data.sources import fashion_mnist, folder
from pipeline.data.webdataset_source import import_webdataset
from pipeline.stages.base import Stage, StageContext


# the data settings each source reads (`shards` checks the class filter and the pool cap against the import, so
# those stay inputs: a change after the import is refused, not ignored; `webdataset` refuses them in preflight)
READ_BY_SOURCE = {
    "fashion-mnist": ("source", "path", "labels_per_class", "holdout_per_class", "seed", "shard_size",
                      "max_unlabeled", "classes", "out_of_domain_unlabeled"),
    "shards": ("source", "path", "max_unlabeled", "classes", "out_of_domain_unlabeled"),
    "webdataset": ("source", "webdataset"),
}
READ_BY_SOURCE["folder"] = READ_BY_SOURCE["fashion-mnist"] + ("test_fraction",)


def inputs(ctx: StageContext, stage: Stage) -> dict:
    """The data settings the source reads: one it ignores (an import's own split settings under `source:
    shards`, `test_fraction` for Fashion-MNIST) no longer refuses a rerun; a record made before keeps such a
    field as it recorded it. The class names file of shards used in place counts by its content."""
    read, recorded = READ_BY_SOURCE[ctx.config.data.source], ctx.recorded_inputs(stage)
    found = {key: value if key in read else recorded[key] for key, value in to_dict(ctx.config.data).items()
             if key in read or key in recorded}
    classes_file = ctx.config.data.webdataset.classes_file if ctx.config.data.webdataset else None
    if classes_file and Path(classes_file).is_file() and ctx.fingerprints(stage, "classes_file_sha256"):
        found["classes_file_sha256"] = sha256_file(Path(classes_file))
    return found


def class_filter(data: DataConfig) -> ClassFilter | None:
    if data.out_of_domain_unlabeled and not data.classes:
        raise RunDirError("data.out_of_domain_unlabeled needs data.classes (which classes are the target task)")
    return ClassFilter(data.classes, data.out_of_domain_unlabeled) if data.classes else None


def run(ctx: StageContext, stage: Stage) -> None:
    import_data(ctx.config.data, ctx.run.data_dir, ctx.config.runtime.progress)
    ctx.run.mark_done(stage.name)


def import_data(d: DataConfig, out: Path, progress: bool) -> None:
    """Import `d`'s source into `out` (`source: webdataset`: only its manifest; `source: shards`: check the
    existing import there)."""
    if d.source == "fashion-mnist":
        import_fashion_mnist(out, d.path, d.labels_per_class, d.holdout_per_class, d.seed,
                             d.shard_size, progress=progress, max_unlabeled=d.max_unlabeled, class_filter=class_filter(d))
    elif d.source == "folder":
        if not d.path:
            raise RunDirError("data.source is 'folder' but data.path (the image folder) is not set")
        import_folder(d.path, out, d.labels_per_class, d.holdout_per_class, d.seed,
                      d.shard_size, d.test_fraction, progress=progress, max_unlabeled=d.max_unlabeled,
                      class_filter=class_filter(d))
    elif d.source == "webdataset":
        import_webdataset(d, out, progress)
    else:
        refuse_settings_an_import_ignores(d, open_data(out).manifest)  # opening it validates the import


def refuse_settings_an_import_ignores(d: DataConfig, manifest: dict) -> None:
    """`source: shards` reads an import as it was made: a class filter or pool cap asked for here but not the
    import's would be ignored silently (a run asking for 2 classes trained a 10-class teacher)."""
    made = manifest.get("params", {})
    class_filter(d)  # out_of_domain_unlabeled without classes: refused as for the other sources
    if d.classes and not _same_class_filter(d, manifest):
        raise RunDirError(f"data.classes {list(d.classes)} (out_of_domain_unlabeled {d.out_of_domain_unlabeled}) is "
                          f"not the class filter the import at data.path was made with (its classes: "
                          f"{', '.join(map(str, manifest.get('classes', [])[:10]))}; out_of_domain_unlabeled "
                          f"{bool(made.get('out_of_domain_unlabeled'))}); data.source: shards uses an import as it is: "
                          "import again with the class filter, or leave data.classes out")
    if d.max_unlabeled is not None and d.max_unlabeled != made.get("max_unlabeled"):
        raise RunDirError(f"data.max_unlabeled is {d.max_unlabeled}, but the import at data.path was made with "
                          f"{made.get('max_unlabeled')}; data.source: shards uses an import as it is: import again "
                          f"with that cap, or --set data.max_unlabeled=null ({PRESET_CAP_NOTE})")


def _same_class_filter(d: DataConfig, manifest: dict) -> bool:
    """`data.classes` (names, or source indices as text) names the import's classes in its order, with the
    same out-of-domain pool. Indices are read against the source's class names where they are known
    (Fashion-MNIST's; an image folder's sub-folders while it exists); otherwise they must be the names."""
    made = manifest.get("params", {})
    recorded = made.get("classes") or manifest.get("classes", [])
    if len(d.classes) != len(recorded) or d.out_of_domain_unlabeled != bool(made.get("out_of_domain_unlabeled")):
        return False
    names = _source_class_names(made.get("kind"), manifest)
    return all(item == name or (item.isdecimal() and names is not None and int(item) < len(names)
                                and names[int(item)] == name) for item, name in zip(map(str, d.classes), recorded))


def _source_class_names(kind: object, manifest: dict) -> list[str] | None:
    if kind == "fashion-mnist":
        return list(fashion_mnist.CLASS_NAMES)
    source = Path(str(manifest.get("source", "")))
    if kind == "folder" and source.is_dir():
        return folder.class_names(source)
    return None
