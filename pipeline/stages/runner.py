"""Running a stage graph: skip what is done, refuse what was started with other inputs, redo on request.

Each stage writes under RUN/<stage>/ with a DONE marker last and records its inputs in
stage.json; a rerun with other inputs is refused. `--only` runs one stage (the stages it
needs must be done); `--from` forgets that stage and every stage downstream of it and runs
them again.

The runner owns the process lifecycle: one process state (accelerate's PartialState) is
created before the first stage, shared by every stage, and torn down once after the last.
Stages never end the process group, so several processes (torchrun, accelerate launch)
pass every barrier between stages.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pipeline.config.loading import config_to_yaml, fingerprint
from pipeline.config.schema import to_dict
from pipeline.config.sections import Config
from pipeline.core.atomic import write_json, write_text
from pipeline.core.rundir import RunDir, RunDirError
from pipeline.engine.peer_watch import stop_watching_peers
from pipeline.engine.ranks import check_same_run_dir, check_same_settings, on_every_rank, on_main_rank
from pipeline.engine.runtime import mixed_precision, process_state
from pipeline.stages.base import TRAINING_KINDS, Stage, StageContext, StageGraph
from pipeline.stages.graph import build_graph
from pipeline.stages.preflight import preflight


def make_run_dir(config: Config, run_dir: str | Path) -> RunDir:
    """The run directory; with `data.source: shards` its data is the import at `data.path`."""
    if config.data.source == "shards":
        if not config.data.path:
            raise RunDirError("data.source is 'shards' but data.path is not set (the imported data directory)")
        return RunDir(run_dir, config.data.path)
    return RunDir(run_dir)


def stage_inputs(ctx: StageContext, stage: Stage) -> dict:
    """What the stage records and a rerun must match: its own inputs, and the precision its arithmetic runs in
    where that changes its output (a bf16 run resumed in fp32, or finished in one and skipped as done in the
    other, mixed the two silently; records made before the key keep matching without it)."""
    record = stage.inputs(ctx, stage)
    precision = _precision(ctx, stage)
    if precision is not None and ctx.fingerprints(stage, "mixed_precision"):
        recorded = ctx.recorded_inputs(stage)
        # a finished stage is what it is: reporting it, or training the next round, on a machine of another kind
        # (auto: bf16 on a GPU, fp32 on a CPU) reads it as made, and only a stage still to run must match
        done = ctx.run.is_done(stage.name) and "mixed_precision" in recorded
        record["mixed_precision"] = recorded["mixed_precision"] if done else precision
    return record


def _precision(ctx: StageContext, stage: Stage) -> str | None:
    runtime = ctx.config.runtime
    if stage.kind in TRAINING_KINDS:
        return mixed_precision(runtime)
    if stage.kind == "pseudo_label":  # autocast on a GPU only
        return mixed_precision(runtime) if torch.cuda.is_available() else "no"
    if stage.kind == "select" and ctx.config.select.calibrate:  # the temperature, fit under the accelerator's
        return mixed_precision(runtime)
    return None


def _check_needs(ctx: StageContext, stage: Stage, running: set[str]) -> None:
    for need in stage.needs:
        if need not in running and not ctx.run.is_done(need):
            raise RunDirError(f"stage '{stage.name}' needs '{need}', which is not done in {ctx.run.root}; "
                              f"run without --only, or with --only {need} first")


def _check_made_with_this_config(ctx: StageContext, stage: Stage, running: set[str]) -> None:
    """A stage without inputs of its own (the report) describes the stages it needs: those done by an earlier
    invocation must have been made with this config (`--only report --set student.rounds=1` rewrote the run's
    record and hid a finished round), as a rerun of each would check."""
    def check() -> None:
        for need in (ctx.graph.get(name) for name in stage.needs if name not in running):
            if need.fingerprinted:
                record = stage_inputs(ctx, need)
                ctx.run.begin_stage(need.name, {"fingerprint": fingerprint(record), "inputs": record})
        left_out = [name for name in ctx.run.planned_stages() or [] if name not in ctx.graph.names
                    and ctx.run.is_done(name)]
        if left_out and not running & set(stage.needs):
            raise RunDirError(f"{', '.join(left_out)} done in {ctx.run.root} but not a stage of this config: "
                              f"`--only {stage.name}` would leave {'them' if len(left_out) > 1 else 'it'} out; "
                              "run it with the config that made the run")

    on_main_rank(ctx.state, check)


def _run_stage(ctx: StageContext, stage: Stage, before_work: Callable[[], None]) -> None:
    """Refuse other inputs, skip a done stage, else `before_work()` and run it."""
    state, run = ctx.state, ctx.run

    def begin() -> None:
        record = stage_inputs(ctx, stage)
        run.begin_stage(stage.name, {"fingerprint": fingerprint(record), "inputs": record})

    on_main_rank(state, begin if stage.fingerprinted else lambda: None)
    if stage.fingerprinted and run.is_done(stage.name):
        state.print(f"[{stage.name}] done already; skipping (use --from {stage.name} to redo)")
        return
    on_main_rank(state, before_work)
    timed = stage.fingerprinted and state.is_main_process
    if timed:
        run.clear_failure(stage.name)
    try:
        with run.stage_clock(stage.name) if timed else contextlib.nullcontext():
            if stage.main_process_only:  # the others wait; its failure reaches them, named
                on_main_rank(state, lambda: stage.run(ctx, stage))
            else:
                stage.run(ctx, stage)
                state.wait_for_everyone()
    except Exception as error:  # a kill or Ctrl-C leaves the stage resumable, not failed
        # rank 0's own error: under several processes a stage all ranks run may fail on rank 0 as just the
        # broken collective of a peer that failed (or was killed); each rank's own error is in its log
        if timed and (state.num_processes == 1 or stage.main_process_only):
            run.record_failure(stage.name, error)
        if timed:
            run.forget_if_nothing_made(stage.name)
        raise


def run_pipeline(config: Config, run_dir: str | Path, only: str | None = None, start: str | None = None) -> None:
    state = process_state(config.runtime.dist_timeout_minutes, config.runtime.peer_timeout_s)  # this run's one
    try:
        check_same_settings(state, {**to_dict(config), "--only": only, "--from": start})
        graph, stages, run = _prepared(state, config, run_dir, lambda g: g.select(only, start), reset=bool(start))
        run_stages(config, run, graph, stages, state, reset=bool(start))
    finally:
        end_processes(state)


def run_up_to(config: Config, run_dir: str | Path, target: str, state) -> None:
    """Run `target` and every stage it needs (skipping what is done) in the caller's process state;
    `selftrain compare` runs many such runs under one process group."""
    graph, stages, run = _prepared(state, config, run_dir, lambda g: g.upstream(target), reset=False)
    run_stages(config, run, graph, stages, state, reset=False)


def _prepared(state, config: Config, run_dir: str | Path, select: Callable[[StageGraph], list[Stage]],
              reset: bool) -> tuple[StageGraph, list[Stage], RunDir]:
    """The graph, the stages `select` picks and the run directory, checked by preflight before anything is
    written, on every rank (its own paths: one rank's refusal stops them all). `reset`: `--from` forgets what it
    runs, so an import it redoes is not the one on disk."""
    def plan() -> tuple[StageGraph, list[Stage], RunDir]:
        graph = build_graph(config)
        stages = select(graph)
        run = make_run_dir(config, run_dir)
        preflight(config, graph, run, reimport=reset and any(stage.name == "data" for stage in stages))
        return graph, stages, run

    return on_every_rank(state, plan)


def run_stages(config: Config, run: RunDir, graph, stages: list[Stage], state, reset: bool) -> None:
    """Hold the run's lock and run `stages` in order (`reset`: forget them first, for --from)."""
    on_main_rank(state, run.acquire)
    try:
        check_same_run_dir(state, run.root)
        ctx = StageContext(config, run, state, graph)
        recorded = False

        def record_config() -> None:
            """RUN/config.yaml and stages.json once a stage does work: a rerun refused (or with nothing
            left to do) leaves the record of the config that made the results."""
            nonlocal recorded
            if not recorded:
                write_text(run.config_path, config_to_yaml(config))
                write_json(run.stage_list_path, {"stages": graph.names})
                recorded = True

        def forget() -> None:
            forgotten = [stage.name for stage in stages if run.stage_dir(stage.name).exists()]
            run.reset_stages([(stage.name, stage.kind) for stage in stages], flag=stages[0].name)
            if forgotten:
                print(f"--from {stages[0].name}: forgot {', '.join(forgotten)} (their files removed; redone now)")

        on_main_rank(state, forget if reset else lambda: None)
        running = {s.name for s in stages}
        for stage in stages:
            _check_needs(ctx, stage, running)
            if not stage.fingerprinted:
                _check_made_with_this_config(ctx, stage, running)
            _run_stage(ctx, stage, record_config)
    finally:
        if state.is_main_process:
            run.release()


def end_processes(state) -> None:
    """Tear the process group down once, after the last stage (every rank reaches this)."""
    stop_watching_peers()
    if dist.is_available() and dist.is_initialized():
        state.destroy_process_group()
