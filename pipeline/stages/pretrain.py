"""Stages `pretrain_data` and `pretrain`: supervised pretraining on another labeled data set.

Reads: `pretrain.data` (imported into RUN/pretrain_data/, or an existing import when
`source: shards`), the teacher's architecture and input size, `pretrain.train`.
Writes: pretrain/checkpoint/ (the source classes' head), metrics.json, DONE. A stage whose
`model.init` is "pretrain" starts from it with a new head for its own classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config.schema import to_dict
from pipeline.config.sections import Config, DataConfig, StageConfig
from pipeline.core.rundir import RunDir, RunDirError
from pipeline.data.imageset import open_data
from pipeline.engine.training import train_fingerprint_inputs
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.data_import import import_data
from pipeline.stages.teacher import train_supervised

DATA_STAGE = "pretrain_data"


def source_data(config: Config) -> DataConfig:
    if config.pretrain.data is None:
        raise RunDirError('model.init "pretrain" needs a pretrain.data section (the labeled source data set)')
    return config.pretrain.data


def data_dir(config: Config, run: RunDir) -> Path:
    data = source_data(config)
    if data.source == "shards":
        if not data.path:
            raise RunDirError("pretrain.data.source is 'shards' but pretrain.data.path is not set")
        return Path(data.path)
    return run.stage_dir(DATA_STAGE)


def pretrain_stage_config(config: Config) -> StageConfig:
    """The teacher's model (architecture, input size, noise) without its init, trained with `pretrain.train`."""
    return StageConfig(model=dataclasses.replace(config.teacher.model, init=None), train=config.pretrain.train)


def import_inputs(ctx: StageContext, stage: Stage) -> dict:
    return to_dict(source_data(ctx.config))


def import_run(ctx: StageContext, stage: Stage) -> None:
    import_data(source_data(ctx.config), data_dir(ctx.config, ctx.run), ctx.config.runtime.progress)
    ctx.run.mark_done(stage.name)


def inputs(ctx: StageContext, stage: Stage) -> dict:
    """The source data's config and its labeled shards (an import used in place, `source: shards`, may be
    made again under the same path), the model, the training and the seed."""
    cfg = pretrain_stage_config(ctx.config)
    found = {"data": to_dict(source_data(ctx.config)), "model": to_dict(cfg.model),
             "train": train_fingerprint_inputs(cfg.train), "seed": ctx.config.seed}
    if ctx.fingerprints(stage, "data_manifest"):  # absent from records made before it: those keep matching
        found["data_manifest"] = open_data(data_dir(ctx.config, ctx.run)).manifest["splits"]["labeled"]["shards"]
    return found


def run(ctx: StageContext, this: Stage) -> dict:
    data = open_data(data_dir(ctx.config, ctx.run))
    return train_supervised(ctx.config, ctx.run, data, pretrain_stage_config(ctx.config), this.name)
