"""Stage `data`: import the configured source into webdataset shards (or check an existing import).

Reads: Fashion-MNIST idx files, an image folder, an existing import (`data.source: shards`), or
shards written by other tools, used in place (`data.source: webdataset`: streamed once, not copied).
Writes: RUN/data/{labeled,holdout,unlabeled,test}/*.tar + manifest.json (written last), with the
files it writes journaled first (pipeline.core.owned), then DONE; for `webdataset` only manifest.json.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config.schema import to_dict
from pipeline.core.rundir import RunDirError
from pipeline.data.imageset import open_data
from pipeline.config.sections import DataConfig
from pipeline.data.importer import ClassFilter, import_fashion_mnist, import_folder
from pipeline.data.webdataset_source import import_webdataset
from pipeline.stages.base import Stage, StageContext


def inputs(ctx: StageContext, stage: Stage) -> dict:
    return to_dict(ctx.config.data)


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
    if d.classes and len(d.classes) != manifest.get("num_classes"):
        raise RunDirError(f"data.classes keeps {len(d.classes)} classes, but the import at data.path has "
                          f"{manifest.get('num_classes')} ({', '.join(map(str, manifest.get('classes', [])[:10]))}); "
                          "data.source: shards uses an import as it is: import again with the class filter, or leave "
                          "data.classes out")
    if d.max_unlabeled is not None and d.max_unlabeled != made.get("max_unlabeled"):
        raise RunDirError(f"data.max_unlabeled is {d.max_unlabeled}, but the import at data.path was made with "
                          f"{made.get('max_unlabeled')}; data.source: shards uses an import as it is: import again "
                          "with that cap, or leave data.max_unlabeled out")
