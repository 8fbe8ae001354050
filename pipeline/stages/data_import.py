"""Stage `data`: import the configured source into webdataset shards (or check an existing import).

Reads: Fashion-MNIST idx files, an image folder, or an existing import (`data.source: shards`).
Writes: RUN/data/{labeled,holdout,unlabeled,test}/*.tar + manifest.json (written last), with the
files it writes journaled first (pipeline.core.owned), then DONE.
"""

from __future__ import annotations

from pipeline.config.schema import to_dict
from pipeline.core.rundir import RunDirError
from pipeline.data.imageset import open_data
from pipeline.data.importer import import_fashion_mnist, import_folder
from pipeline.stages.base import Stage, StageContext


def inputs(ctx: StageContext, stage: Stage) -> dict:
    return to_dict(ctx.config.data)


def run(ctx: StageContext, stage: Stage) -> None:
    d, run_dir, progress = ctx.config.data, ctx.run, ctx.config.runtime.progress
    if d.source == "fashion-mnist":
        import_fashion_mnist(run_dir.data_dir, d.path, d.labels_per_class, d.holdout_per_class, d.seed,
                             d.shard_size, progress=progress, max_unlabeled=d.max_unlabeled)
    elif d.source == "folder":
        if not d.path:
            raise RunDirError("data.source is 'folder' but data.path (the image folder) is not set")
        import_folder(d.path, run_dir.data_dir, d.labels_per_class, d.holdout_per_class, d.seed,
                      d.shard_size, d.test_fraction, progress=progress, max_unlabeled=d.max_unlabeled)
    else:
        open_data(run_dir.data_dir)  # validates the existing import
    run_dir.mark_done(stage.name)
