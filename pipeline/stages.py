"""The ordered stages of a run and the rules for running, skipping and redoing them.

Each stage is a function of (config, run directory, data) with its outputs
under RUN/<stage>/ and a DONE marker written last. `--only` runs one stage
(its inputs must be done); `--from` forgets that stage and every later one
and runs them again.
"""

from __future__ import annotations

from pathlib import Path


from pipeline.atomic import write_text
from pipeline.config import Config, config_to_yaml, fingerprint
from pipeline.configschema import to_dict
from pipeline.imageset import DataInfo, open_data
from pipeline.importer import import_fashion_mnist, import_folder
from pipeline.rundir import RunDir, RunDirError
from pipeline.runtime import process_state
from pipeline.pseudo_label_stage import run_pseudo_label
from pipeline.select_stage import run_select
from pipeline.teacher_stage import StageInputs, run_teacher, training_fingerprint_inputs
from teachers.checkpoint import checkpoint_hash

STAGES = ("data", "teacher", "pseudo_label", "select")


def data_root(config: Config, run: RunDir) -> Path:
    """Imported data lives in RUN/data, unless the config points at an existing import."""
    if config.data.source == "shards":
        if not config.data.path:
            raise RunDirError("data.source is 'shards' but data.path is not set (the imported data directory)")
        return Path(config.data.path)
    return run.data_dir


def run_data(config: Config, run: RunDir, progress: bool) -> None:
    d = config.data
    if d.source == "fashion-mnist":
        import_fashion_mnist(run.data_dir, d.path, d.labels_per_class, d.holdout_per_class, d.seed,
                             d.shard_size, progress=progress)
    elif d.source == "folder":
        if not d.path:
            raise RunDirError("data.source is 'folder' but data.path (the image folder) is not set")
        import_folder(d.path, run.data_dir, d.labels_per_class, d.holdout_per_class, d.seed,
                      d.shard_size, d.test_fraction, progress=progress)
    else:
        open_data(data_root(config, run))  # validates the existing import
    run.mark_done("data")


def stage_inputs(stage: str, config: Config, run: RunDir) -> dict:
    """What a stage's result depends on; a rerun with other inputs is refused."""
    if stage == "data":
        return to_dict(config.data)
    data = open_data(data_root(config, run))
    if stage == "teacher":
        return training_fingerprint_inputs(config.teacher, config.seed, data)
    teacher = checkpoint_hash(run.checkpoint_dir("teacher"))
    if stage == "pseudo_label":
        return {"teacher_sha256": teacher, "pseudo_label": to_dict(config.pseudo_label),
                "unlabeled_shards": [r["sha256"] for r in data.manifest["splits"]["unlabeled"]["shards"]]}
    return {"teacher_sha256": teacher, "select": to_dict(config.select),
            "holdout_shards": [r["sha256"] for r in data.manifest["splits"]["holdout"]["shards"]]}


def _run_stage(stage: str, config: Config, run: RunDir, data: DataInfo) -> None:
    teacher_dir = run.checkpoint_dir("teacher")
    if stage == "teacher":
        run_teacher(StageInputs(config, run, data))
    elif stage == "pseudo_label":
        run_pseudo_label(config, run, data, teacher_dir)
    elif stage == "select":
        run_select(config, run, data, teacher_dir)


def select_stages(only: str | None, start: str | None) -> list[str]:
    for value, flag in ((only, "--only"), (start, "--from")):
        if value is not None and value not in STAGES:
            raise RunDirError(f"{flag} {value!r}: unknown stage; stages are {', '.join(STAGES)}")
    if only and start:
        raise RunDirError("use either --only or --from, not both")
    if only:
        return [only]
    return list(STAGES[STAGES.index(start):]) if start else list(STAGES)


def run_pipeline(config: Config, run_dir: str | Path, only: str | None = None,
                 start: str | None = None) -> None:
    state = process_state()
    run = RunDir(run_dir)
    stages = select_stages(only, start)
    if state.is_main_process:
        run.acquire()
    try:
        if state.is_main_process:
            write_text(run.config_path, config_to_yaml(config))
            if start:
                for stage in STAGES[STAGES.index(start):]:
                    run.reset_stage(stage)
        state.wait_for_everyone()
        for stage in stages:
            for before in STAGES[:STAGES.index(stage)]:
                if before not in stages and not run.is_done(before):
                    raise RunDirError(f"stage '{stage}' needs '{before}', which is not done in {run.root}; "
                                      f"run without --only, or with --only {before} first")
            if state.is_main_process:
                record = stage_inputs(stage, config, run)
                run.begin_stage(stage, {"fingerprint": fingerprint(record), "inputs": record})
            state.wait_for_everyone()
            if run.is_done(stage):
                state.print(f"[{stage}] done already; skipping (use --from {stage} to redo)")
                continue
            if stage == "data":
                with state.main_process_first():
                    if state.is_main_process:
                        run_data(config, run, config.runtime.progress)
                continue
            _run_stage(stage, config, run, open_data(data_root(config, run)))
            state.wait_for_everyone()
    finally:
        if state.is_main_process:
            run.release()


def describe(run_dir: str | Path) -> list[tuple[str, str]]:
    run = RunDir(run_dir)
    if not run.root.exists():
        raise RunDirError(f"run directory {run.root} does not exist")
    return [(stage, run.stage_state(stage)) for stage in STAGES]


