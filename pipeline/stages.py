"""The ordered stages of a run and the rules for running, skipping and redoing them.

    data, teacher, pseudo_label_r1, select_r1, student_r1, ..., student_rK, report

Round i's teacher is the teacher stage (i = 1) or student_r{i-1}. Each stage
writes under RUN/<stage>/ with a DONE marker last and records its inputs in
stage.json; a rerun with other inputs is refused. `--only` runs one stage
(earlier ones must be done); `--from` forgets that stage and every later one
and runs them again.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.atomic import write_text
from pipeline.config import Config, config_to_yaml, fingerprint
from pipeline.configschema import to_dict
from pipeline.imageset import DataInfo, open_data
from pipeline.importer import import_fashion_mnist, import_folder
from pipeline.pseudo_label_stage import run_pseudo_label
from pipeline.report import run_report
from pipeline.rundir import RunDir, RunDirError
from pipeline.runtime import process_state
from pipeline.select_stage import run_select
from pipeline.student_stage import run_student
from pipeline.teacher_stage import run_teacher
from pipeline.training_stage import training_fingerprint_inputs
from teachers.checkpoint import checkpoint_hash


def stage_names(config: Config) -> list[str]:
    names = ["data", "teacher"]
    for i in range(1, config.student.rounds + 1):
        names += [f"pseudo_label_r{i}", f"select_r{i}", f"student_r{i}"]
    if config.student.rounds == 0:
        names += ["pseudo_label_r1", "select_r1"]
    return names + ["report"]


def _round(stage: str) -> int:
    return int(stage.rsplit("_r", 1)[1])


def round_teacher(run: RunDir, round_index: int) -> Path:
    return run.checkpoint_dir("teacher" if round_index == 1 else f"student_r{round_index - 1}")


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
                             d.shard_size, progress=progress, max_unlabeled=d.max_unlabeled)
    elif d.source == "folder":
        if not d.path:
            raise RunDirError("data.source is 'folder' but data.path (the image folder) is not set")
        import_folder(d.path, run.data_dir, d.labels_per_class, d.holdout_per_class, d.seed,
                      d.shard_size, d.test_fraction, progress=progress, max_unlabeled=d.max_unlabeled)
    else:
        open_data(data_root(config, run))  # validates the existing import
    run.mark_done("data")


def stage_inputs(stage: str, config: Config, run: RunDir) -> dict:
    """What a stage's result depends on; a rerun with other inputs is refused."""
    if stage == "data":
        return to_dict(config.data)
    if stage == "report":
        return {}
    data = open_data(data_root(config, run))
    if stage == "teacher":
        return training_fingerprint_inputs(config.teacher, config.seed, data)
    teacher = checkpoint_hash(round_teacher(run, _round(stage)))
    if stage.startswith("pseudo_label"):
        return {"teacher_sha256": teacher, "pseudo_label": to_dict(config.pseudo_label),
                "unlabeled_shards": [r["sha256"] for r in data.manifest["splits"]["unlabeled"]["shards"]]}
    if stage.startswith("select"):
        return {"teacher_sha256": teacher, "select": to_dict(config.select),
                "holdout_shards": [r["sha256"] for r in data.manifest["splits"]["holdout"]["shards"]]}
    return {"teacher_sha256": teacher, **training_fingerprint_inputs(config.student, config.seed, data),
            "student": {k: v for k, v in to_dict(config.student).items() if k not in ("model", "train", "rounds")}}


def _run_stage(stage: str, config: Config, run: RunDir, data: DataInfo) -> None:
    if stage == "teacher":
        run_teacher(config, run, data)
        return
    if stage == "report":
        if process_state().is_main_process:
            run_report(config, run, stage_names(config))
        return
    i = _round(stage)
    teacher_dir = round_teacher(run, i)
    if stage.startswith("pseudo_label"):
        run_pseudo_label(config, run, data, teacher_dir, name=stage)
    elif stage.startswith("select"):
        run_select(config, run, data, teacher_dir, labels_stage=f"pseudo_label_r{i}", name=stage)
    else:
        run_student(config, run, data, i, teacher_dir, f"pseudo_label_r{i}", f"select_r{i}", stage)


def select_stages(all_stages: list[str], only: str | None, start: str | None) -> list[str]:
    for value, flag in ((only, "--only"), (start, "--from")):
        if value is not None and value not in all_stages:
            raise RunDirError(f"{flag} {value!r}: unknown stage; stages are {', '.join(all_stages)}")
    if only and start:
        raise RunDirError("use either --only or --from, not both")
    if only:
        return [only]
    return all_stages[all_stages.index(start):] if start else list(all_stages)


def run_pipeline(config: Config, run_dir: str | Path, only: str | None = None,
                 start: str | None = None) -> None:
    state = process_state()
    run = RunDir(run_dir)
    all_stages = stage_names(config)
    stages = select_stages(all_stages, only, start)
    if state.is_main_process:
        run.acquire()
    try:
        if state.is_main_process:
            write_text(run.config_path, config_to_yaml(config))
            if start:
                for stage in all_stages[all_stages.index(start):]:
                    run.reset_stage(stage)
        state.wait_for_everyone()
        for stage in stages:
            for before in all_stages[:all_stages.index(stage)]:
                if before != "report" and before not in stages and not run.is_done(before):
                    raise RunDirError(f"stage '{stage}' needs '{before}', which is not done in {run.root}; "
                                      f"run without --only, or with --only {before} first")
            if stage != "report" and state.is_main_process:
                record = stage_inputs(stage, config, run)
                run.begin_stage(stage, {"fingerprint": fingerprint(record), "inputs": record})
            state.wait_for_everyone()
            if stage != "report" and run.is_done(stage):
                state.print(f"[{stage}] done already; skipping (use --from {stage} to redo)")
                continue
            started = time.perf_counter()
            if stage == "data":
                if state.is_main_process:
                    run_data(config, run, config.runtime.progress)
            else:
                _run_stage(stage, config, run, open_data(data_root(config, run)))
            state.wait_for_everyone()
            if stage != "report" and state.is_main_process:
                run.record_wall_time(stage, time.perf_counter() - started)
    finally:
        if state.is_main_process:
            run.release()


def describe(run_dir: str | Path) -> list[tuple[str, str]]:
    run = RunDir(run_dir)
    if not run.root.exists():
        raise RunDirError(f"run directory {run.root} does not exist")
    from pipeline.config import load_config

    config = load_config(run.config_path) if run.config_path.exists() else Config()
    return [(stage, run.stage_state(stage)) for stage in stage_names(config)]
