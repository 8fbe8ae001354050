"""Checks that run before the first stage: what later stages need and can be checked cheaply.

A value refused here never reaches a stage's stage.json, so the corrected rerun simply runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline.config.schema import ConfigError
from pipeline.config.sections import Config, DataConfig, ModelConfig
from pipeline.core.atomic import read_json
from pipeline.core.rundir import RunDir, RunDirError
from pipeline.data.imageset import DataDirError, open_data
from pipeline.data.importer import check_same_folder, refuse_output_inside_source
from pipeline.data.sources import fashion_mnist, folder
from pipeline.data.sources.fashion_mnist import DataSourceError
from pipeline.data.webdataset_source import shard_lists, webdataset_section
from pipeline.stages import pretrain
from pipeline.stages.base import StageGraph
from pipeline.stages.data_import import refuse_settings_an_import_ignores
from pipeline.engine.init import check_init_exists, names_a_path
from teachers.checkpoint import META, CheckpointError, CheckpointMeta, check_teachers_classes, checkpoint_hash, read_meta
from teachers.grow import grow_state
from teachers.models import ModelError, check_arch, create_model
from students.prune import PruneError, build_pruners

# bytes a Fashion-MNIST-sized import writes per image (PNG + tar headers), with room to spare
BYTES_PER_IMAGE_ESTIMATE = 2048
FASHION_MNIST_IMAGES = 70_000
FASHION_MNIST_TEST = 10_000


def _check_model(model: ModelConfig, where: str) -> None:
    try:
        check_arch(model.arch)
    except ModelError as error:  # which of teacher, student, distill.students[i] holds it
        raise ModelError(f"{where}.arch: {error}") from None
    check_init_exists(model.init, model.arch, f"{where}.init")
    _check_buildable(model, where)


def _check_buildable(model: ModelConfig, where: str) -> None:
    """The model built with its options on the meta device (no memory, milliseconds) and run on one image of
    its input size: an option the architecture refuses (stochastic depth on densenet, vgg, ShuffleNet) or a
    size it cannot take (a ViT's fixed size, a stem larger than the image) is found here, not at its stage."""
    try:
        with torch.device("meta"):
            create_model(model.arch, 2, 1, model.drop_rate, model.drop_path_rate).eval()(
                torch.zeros(1, 1, model.input_size, model.input_size))
    except ModelError as error:
        if model.drop_path_rate > 0:
            raise ModelError(f"{where}.drop_path_rate is {model.drop_path_rate:g}, and {model.arch} has no "
                             f"stochastic depth; set {where}.drop_path_rate=0") from None
        raise ModelError(f"{where} ({model.arch}, drop_rate {model.drop_rate:g}): {error}") from None
    except Exception:  # noqa: BLE001 - an op without a meta kernel, or the size: told apart on the CPU
        _check_input_size_on_cpu(model, where)


def _check_input_size_on_cpu(model: ModelConfig, where: str) -> None:
    try:
        with torch.inference_mode():
            create_model(model.arch, 2, 1).eval()(torch.zeros(1, 1, model.input_size, model.input_size))
    except Exception as error:  # noqa: BLE001 - timm raises AssertionError, RuntimeError, ... for a wrong size
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{where}.input_size {model.input_size}: {model.arch} cannot take "
                         f"{model.input_size} px images ({message}); give another input_size or architecture") \
            from None


def _init_arch(config: Config, model: ModelConfig) -> str | None:
    """The architecture a model's init was trained as: the teacher's for `teacher` (round 1's student; later
    rounds' teachers are students of its own architecture) and for the pretraining stages, a checkpoint
    directory's own (its meta.json, read by `check_init_exists`); None for random, weights files and timm."""
    if model.init in ("teacher", "pretrain", "ssl_pretrain"):
        return config.teacher.model.arch
    if names_a_path(model.init) and Path(model.init).is_dir():
        return read_meta(Path(model.init)).arch
    return None


def _check_grows(config: Config, model: ModelConfig, where: str) -> None:
    """An init of another architecture is grown into the model (resnet18 -> resnet34): done here from a
    random-init source on the CPU (about a second), with the check the stage makes, so a pair that cannot grow
    is refused before the first stage, not when the stage that reads it starts."""
    source_arch = _init_arch(config, model)
    if source_arch is None or source_arch == model.arch:
        return
    meta = CheckpointMeta(arch=source_arch, num_classes=2, in_chans=1, input_size=config.teacher.model.input_size,
                          mean=(0.5,), std=(0.5,), class_names=("0", "1"), config_hash="preflight")
    with torch.random.fork_rng(devices=[]):
        weights, grown = create_model(source_arch, 2, 1).state_dict(), create_model(model.arch, 2, 1)
    try:
        grow_state(grown, weights, meta, where=f'{where}.init "{model.init}" ({model.arch})')
    except CheckpointError as error:
        raise ModelError(f"{error}. Give {where}.arch={source_arch} or another {where}.init") from None


def _refuse_inside_run(path: str, key: str, run: RunDir) -> None:
    """A checkpoint or weights file inside this run directory belongs to one of its stages, which `--from`
    deletes before the stage that reads it runs (and a rerun of that stage would replace it)."""
    if Path(path).resolve().is_relative_to(run.root.resolve()):
        raise ModelError(f"{key}: {path} is inside this run directory ({run.root}); copy it out of the run "
                         "directory first (--from would delete it, and a rerun of its stage replace it)")


def _check_run_stage_init(config: Config, model: ModelConfig, where: str) -> None:
    if model.init == "pretrain" and config.pretrain.data is None:
        raise ModelError(f'{where}.init is "pretrain" but the config has no pretrain.data (the labeled source data)')
    if model.init == "ssl_pretrain" and not config.ssl_pretrain.enabled:
        raise ModelError(f'{where}.init is "ssl_pretrain" but ssl_pretrain.enabled is false')


def _check_prunable(model: ModelConfig, where: str) -> None:
    """Refused before distillation runs, not at its prune stage: a random-init copy at 32 px is traced."""
    try:
        build_pruners(create_model(model.arch, 2, 1).eval(), torch.zeros(1, 1, 32, 32))
    except PruneError as error:
        raise ModelError(f"{where} ({model.arch}) cannot be pruned, and distill.prune.enabled is true: {error}. "
                         "Set distill.prune.enabled=false or distil into another student") from error


OTHER_INITS = 'null (random), "pretrain", "ssl_pretrain", a checkpoint directory, a weights file or "timm:NAME"'


def trained_models(config: Config) -> list[tuple[str, ModelConfig]]:
    """(config key, model) of every model the config trains."""
    models = [("teacher.model", config.teacher.model)]
    if config.student.rounds:
        models.append(("student.model", config.student.model))
    models += [(f"distill.students[{i}]", student) for i, student in enumerate(config.distill.students)]
    if config.distill.students and config.distill.mutual.weight > 0 and config.distill.mutual.peer is not None:
        models.append(("distill.mutual.peer", config.distill.mutual.peer))
    return models


def check_models(config: Config) -> None:
    if config.teacher.model.init == "teacher":
        raise ModelError(f'teacher.model.init "teacher": only a student starts from its teacher; use {OTHER_INITS}')
    for where, model in trained_models(config):
        if where.startswith("distill.") and model.init == "teacher":
            raise ModelError(f'{where}.init "teacher": a distilled student does not start from its teacher\'s '
                             f"weights; use {OTHER_INITS}")
        _check_model(model, where)
        _check_run_stage_init(config, model, where)
        _check_grows(config, model, where)
        if where.startswith("distill.students") and config.distill.prune.enabled:
            _check_prunable(model, where)
    if config.distill.teacher:
        _check_checkpoint_dir(config.distill.teacher, "distill.teacher")


def _check_checkpoint_dir(path: str, where: str) -> None:
    if not (Path(path) / META).exists():
        raise ModelError(f"{where}: {path} is not a checkpoint directory (no {META}){_relative_note(path)}")


def check_given_weights(config: Config, graph: StageGraph, run: RunDir) -> None:
    """The weights of `distill.teacher` and the ensemble members are the ones their meta.json records (a
    damaged or swapped file is refused here, before `--from` forgets the stages they would teach); read
    only while a distillation or pruning stage is still to run."""
    if not any(s.kind in ("distill", "prune") and not run.is_done(s.name) for s in graph.stages):
        return
    for where, directory in config.distill.given_checkpoints():
        try:
            checkpoint_hash(Path(directory))
        except CheckpointError as error:
            raise CheckpointError(f"{where}: {error}") from None


def _relative_note(path: str) -> str:
    return "" if Path(path).is_absolute() else f" (relative to the working directory {Path.cwd()})"


def check_source(data: DataConfig, key: str = "data") -> None:
    """The raw data a new import (or `--from data`) reads is there: checked before `--from` forgets anything.
    (`shards` is checked as the import it is; `webdataset` by its shard lists.) `key`: the section's name."""
    if data.source == "fashion-mnist":
        try:
            fashion_mnist.locate(data.path)
        except DataSourceError as error:
            where = f"{key}.path: {error}{_relative_note(data.path)}" if data.path else str(error)
            raise DataSourceError(where) from None
    elif data.source == "folder":
        if not data.path:
            raise DataSourceError(f"{key}.source is 'folder' but {key}.path (the image folder) is not set")
        if not Path(data.path).is_dir():
            raise DataSourceError(f"{key}.path: image folder {data.path} does not exist or is not a "
                                  f"directory{_relative_note(data.path)}")
    elif data.source == "shards" and key != "data":  # the run's own import is checked by check_data
        if not data.path:
            raise DataSourceError(f"{key}.source is 'shards' but {key}.path (an import) is not set")
        try:
            open_data(Path(data.path))
        except DataDirError as error:
            raise DataSourceError(f"{key}.path: {error}") from None


def check_pretrain_source(config: Config, graph: StageGraph, run: RunDir) -> None:
    """`pretrain.data` is there while its import or the pretraining is still to run (it was found after the
    run's own import, and named as `data.*`)."""
    data = config.pretrain.data
    if data is None or not any(stage.name == "pretrain" for stage in graph.stages):
        return
    if not run.is_done("pretrain" if data.source == "shards" else pretrain.DATA_STAGE):
        check_source(data, "pretrain.data")


def check_folder_unchanged(config: Config, run: RunDir) -> None:
    """The image folder of a finished import still holds what was imported: the data stage is done and
    skipped, and the rounds would train on the old import of a folder since changed (file sizes only)."""
    if not Path(config.data.path).is_dir():  # moved or deleted since: the finished import is what runs read
        print(f"data.path {config.data.path} is not there any more; the finished import in {run.data_dir} is used "
              "as it is (not compared with the folder)")
        return
    _, images, _ = folder.scan(config.data.path)
    check_same_folder(run.data_dir, read_json(run.data_dir / "manifest.json"), config.data.path, images,
                      whole=not config.data.classes and config.data.max_unlabeled is None,
                      advice="rerun with --from data to import the folder as it is now (and redo what was "
                             "trained on the old import)")


def check_holdout_for_calibration(config: Config, run: RunDir, reimport: bool) -> None:
    """`select.calibrate` fits the teacher's temperature on the holdout split: without one, select_r1 refused
    after the teacher had trained, and the fix (a holdout) means importing again."""
    if config.data.source == "shards" or ((run.data_dir / "manifest.json").exists() and not reimport):
        holdout = open_data(run.data_dir).count("holdout")
    elif config.data.source == "webdataset":
        holdout = len(webdataset_section(config.data).holdout)
    else:
        holdout = config.data.holdout_per_class
    if not holdout:
        raise RunDirError("select.calibrate is true but the data has no holdout split to fit the temperature on; "
                          "set data.holdout_per_class > 0 (taken from the labeled budget; data.webdataset.holdout "
                          "for shards used in place), or select.calibrate=false")


def check_data(config: Config, run: RunDir, reimport: bool) -> None:
    """The source of a new import (or of `reimport`, `--from data`) is there; an existing import must have an
    unlabeled pool; a new import must fit on the disk; shards used in place must be listed, named once and
    reachable by name (local files exist, URL schemes are known)."""
    if config.data.source == "webdataset":
        shard_lists(webdataset_section(config.data))
    if config.data.source == "folder" and config.data.path:
        refuse_output_inside_source(run.root, Path(config.data.path), "the run directory")
    if config.data.source == "shards" and config.data.path and not Path(config.data.path).exists():
        raise DataSourceError(f"data.path: import {config.data.path} does not exist (data.source: shards reads "
                              f"an import made by `selftrain data`){_relative_note(config.data.path)}")
    imported = (run.data_dir / "manifest.json").exists()
    if reimport or not imported:
        check_source(config.data)
    if config.data.source == "folder" and imported and not reimport:
        check_folder_unchanged(config, run)
    if config.data.source == "shards" or (imported and not reimport):
        data = open_data(run.data_dir)
        if config.data.source == "shards":  # here, not only in the stage: a refusal there kept its stage.json
            refuse_settings_an_import_ignores(config.data, data.manifest)
        if data.count("unlabeled") == 0:
            raise RunDirError(f"{run.data_dir}: the unlabeled pool is empty; self-training needs unlabeled images "
                              "(re-import with a larger or no --max-unlabeled)")
        return
    needed = _fashion_mnist_images(config.data) * BYTES_PER_IMAGE_ESTIMATE if config.data.source == "fashion-mnist" \
        else None
    if config.data.source == "folder" and config.data.path:
        needed = sum(p.stat().st_size for p in folder.walk_files(Path(config.data.path)) if p.exists()) * 2
    existing = run.root if run.root.exists() else next(p for p in run.root.parents if p.exists())
    free = shutil.disk_usage(existing).free
    if needed is not None and free < needed:
        raise RunDirError(f"{existing}: {free / 1e6:.0f} MB free, the import needs about {needed / 1e6:.0f} MB "
                          "(ENOSPC ahead); free some space or use another --run-dir")


def _fashion_mnist_images(data: DataConfig) -> int:
    """At most how many images an import writes: all 70,000, or with a pool cap the test split, the labeled and
    holdout images and the cap (a 300-image import on a small disk was refused for needing 143 MB)."""
    if data.max_unlabeled is None:
        return FASHION_MNIST_IMAGES
    kept = FASHION_MNIST_TEST + 10 * (data.labels_per_class + data.holdout_per_class) + data.max_unlabeled
    return min(FASHION_MNIST_IMAGES, kept)


def check_precision(config: Config) -> None:
    """fp16 on a machine without a GPU: accelerate trains in fp32 there, and the run recorded fp16."""
    if config.runtime.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("runtime.mixed_precision is fp16, which needs a GPU (on the CPU accelerate trains in fp32 "
                          "without a word); use bf16 or no")


def check_ensemble(config: Config, run: RunDir) -> None:
    """Each `distill.ensemble` member is a checkpoint outside this run directory: one inside it belongs to a
    stage that `--from` may delete and rerun, which would change the teacher under the stages it taught."""
    for i, member in enumerate(config.distill.ensemble):
        _refuse_inside_run(member, f"distill.ensemble[{i}]", run)
        _check_checkpoint_dir(member, f"distill.ensemble[{i}]")


def check_given_teachers(config: Config, run: RunDir, reimport: bool) -> None:
    """`distill.teacher` and the ensemble members carry the imported data's classes in its order (checked
    again by the distill stage, for a run whose import is not made yet or is made again: `reimport`)."""
    if config.distill.students and not reimport and (run.data_dir / "manifest.json").exists():
        check_teachers_classes(config.distill.given_checkpoints(), open_data(run.data_dir).classes)


def preflight(config: Config, graph: StageGraph, run: RunDir, reimport: bool = False) -> None:
    """`reimport`: the data stage runs again in this invocation (`--from data`), so the import on disk is not
    the one later stages will read."""
    check_precision(config)
    check_models(config)
    for where, model in trained_models(config):
        if names_a_path(model.init):
            _refuse_inside_run(model.init, f"{where}.init", run)
    check_ensemble(config, run)
    check_given_weights(config, graph, run)
    check_given_teachers(config, run, reimport)
    check_pretrain_source(config, graph, run)
    if any(stage.kind == "data" for stage in graph.stages):
        check_data(config, run, reimport)
        if config.select.calibrate:
            check_holdout_for_calibration(config, run, reimport)
