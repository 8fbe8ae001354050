"""`selftrain compare`: run the pretraining-vs-self-training grid, resumably, and report it.

The plan (pipeline/experiments/compare_grid.py) is a list of ordinary run directories; each is run
up to its target stage in this one process state (so torchrun / accelerate launch run every job
with all ranks). Finished jobs are skipped without being opened; a killed job resumes. After
each arm the optimizer steps of its final model are checked against the budget.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch
import yaml

from pipeline.config.schema import ConfigError, to_dict
from pipeline.core.atomic import WriteFailed, read_json, write_json, write_text
from pipeline.core.owned import ForeignFilesError, describe_foreign
from pipeline.core.provenance import provenance
from pipeline.core.rundir import RunDir, RunDirError, input_differences
from pipeline.engine.ranks import check_same_settings, raised_on_every_rank
from pipeline.engine.runtime import process_state
from pipeline.experiments.compare_config import CompareConfig
from pipeline.experiments.compare_grid import (MODE_NAMES, Arm, Job, expand, final_stage, job_images, plan_jobs,
                                               select_arms)
from pipeline.experiments.compare_report import write_compare_report
from pipeline.experiments.compare_stats import ArmResult
from pipeline.experiments.summary import SAME_RESULT_KEYS
from pipeline.stages.runner import end_processes, run_up_to

ROUND_STAGES = ("pseudo_label_r{i}", "select_r{i}", "student_r{i}")


class BudgetError(RuntimeError):
    """An arm's final model trained another number of steps than the grid's budget."""


@dataclass(frozen=True)
class Plan:
    arms: list[Arm]
    jobs: list[Job]
    out: Path

    def pending(self) -> list[Job]:
        return [job for job in self.jobs if not RunDir(job.run_dir(self.out)).is_done(job.target)]


def make_plan(config: CompareConfig, out: Path, only: str | None) -> Plan:
    arms = select_arms(expand(config), only)
    return Plan(arms, plan_jobs(config, arms, out), out)


def measured_rate(config: CompareConfig) -> float:
    """Training images per second of the base teacher model at the budget's batch, on this machine
    (a few steps on random data), for the cost estimate only."""
    from pipeline.engine.runtime import configure_threads
    from teachers.models import create_model

    base = config.base_config()
    configure_threads(base.runtime)
    model = create_model(base.teacher.model.arch, 10, 1)  # an unknown arch: ModelError with the closest names
    size, batch = base.teacher.model.input_size, config.budget.batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch,))
    start = 0.0
    for step in range(4):
        if step == 1:
            start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return 3 * batch / (time.perf_counter() - start)


def describe_plan(config: CompareConfig, plan: Plan, rate: float | None) -> str:
    a, b = config.axes, config.budget
    pending = plan.pending()
    images = sum(job_images(job, RunDir(job.run_dir(plan.out)).is_done) for job in pending)
    lines = [f"compare: {len(plan.arms)} arms = init {list(a.init)} x self-training "
             f"{[MODE_NAMES[s] for s in a.self_training]} x policy {list(a.policy)} x labels/class "
             f"{list(a.labels_per_class)} x seeds {list(a.seeds)}",
             f"budget: every arm's final model trains {b.steps} optimizer steps with {b.batch_size} labeled images "
             f"a step (self-training adds {config.base_config().student.unlabeled_ratio}x as many pseudo-labeled "
             "ones); pretraining and the teacher of a self-trained arm are set-up cost, as in Zoph et al.",
             f"jobs: {len(plan.jobs)} ({len(plan.jobs) - len(pending)} done): "
             + ", ".join(f"{sum(j.kind == k for j in plan.jobs)} {k}" for k in ("data", "pretrain", "arms")),
             f"cost: {images:,} training images in the pending jobs' unfinished stages"]
    if rate:
        lines[-1] += (f", about {images / rate / 60:.0f} min at {rate:.0f} img/s measured just now "
                      "(plus imports, labeling and evaluation)")
    for job in plan.jobs:
        state = "done" if job not in pending else "pending"
        lines.append(f"  [{state:7s}] {job.kind}/{job.name} -> {job.target}")
    return "\n".join(lines)


def arm_result(config: CompareConfig, arm: Arm, out: Path) -> ArmResult:
    """The arm's top-1, steps and wall time from its run's metrics; the budget is enforced here."""
    rounds = config.self_training.rounds
    run = RunDir(out / "arms" / arm.run_name)
    stage = final_stage(arm.self_training, rounds)
    metrics = read_json(run.metrics_path(stage))
    if metrics["steps"] != config.budget.steps:
        raise BudgetError(f"arm {arm.name}: {stage} trained {metrics['steps']} steps, the budget is "
                          f"{config.budget.steps} ({run.metrics_path(stage)})")
    labeled_batch = min(config.budget.batch_size, int(metrics["num_labeled"]))
    if metrics.get("labeled_batch", labeled_batch) != labeled_batch:  # absent in runs made before it was recorded
        raise BudgetError(f"arm {arm.name}: {stage} drew {metrics['labeled_batch']} labeled images a step, the "
                          f"budget is {labeled_batch} ({config.budget.batch_size} capped at the "
                          f"{metrics['num_labeled']} labeled images; {run.metrics_path(stage)})")
    stages = ["teacher"] + ([s.format(i=i) for i in range(1, rounds + 1) for s in ROUND_STAGES]
                            if arm.self_training else [])
    wall = sum(run.wall_seconds(s) or read_json(run.metrics_path(s)).get("wall_seconds", 0.0) for s in stages)
    return ArmResult(init=arm.init, self_training=MODE_NAMES[arm.self_training], policy=arm.policy,
                     labels_per_class=arm.labels_per_class, seed=arm.seed, top1=float(metrics["top1"]),
                     steps=int(metrics["steps"]), wall_seconds=round(float(wall), 1))


def finished_arms(config: CompareConfig, out: Path) -> list[Arm]:
    """Every arm of the grid whose final stage is done (a run with --only reports the earlier arms too)."""
    rounds = config.self_training.rounds
    return [arm for arm in expand(config)
            if RunDir(out / "arms" / arm.run_name).is_done(final_stage(arm.self_training, rounds))]


def eta(seconds: dict[str, list[float]], remaining: list[Job]) -> str:
    """", about N min left": the mean time of finished jobs of the same kind, for each remaining job."""
    if not all(job.kind in seconds for job in remaining):
        return ""
    left = sum(sum(seconds[job.kind]) / len(seconds[job.kind]) for job in remaining)
    return f", about {left / 60:.0f} min left"


def resolved_yaml(config: CompareConfig) -> str:
    """The compare config with every default filled in (the base pipeline config included)."""
    return yaml.safe_dump({**to_dict(config), "base": to_dict(config.base_config())}, sort_keys=False)


def refuse_foreign_out(out: Path) -> None:
    """A compare writes into a new directory or into its own (compare.yaml, written first, marks it): never
    beside a user's files."""
    if out.is_dir() and not (out / "compare.yaml").exists():
        names = sorted(p.name for p in out.iterdir())
        if names:
            raise ForeignFilesError(describe_foreign(out, names) + "; nothing was changed. Choose a new --out")


def refuse_unusable_job_dirs(pending: list[Job], out: Path) -> None:
    """Every pending job's run directory that a run would refuse (a user's files in it), named at once before the
    first job (and by --dry-run): the grid used to stop there after the jobs before it had run."""
    problems = []
    for job in pending:
        try:
            RunDir(job.run_dir(out)).check_usable()
        except RunDirError as error:
            problems.append(f"{job.kind}/{job.name}: {error}")
    if problems:
        raise RunDirError(f"{len(problems)} job(s) of this grid cannot run, nothing was run: " + "; ".join(problems[:3])
                          + ("; ..." if len(problems) > 3 else "") + " (--keep-going runs the others)")


def _result_settings(resolved: dict, sources: set[str]) -> dict:
    """A resolved compare config without what may change between runs into one `--out`: the axes, the
    sources other than `sources` (a source added with its init, or no longer used), and the base runtime
    settings that do not change results (threads, workers, progress bars, logging)."""
    kept = {key: value for key, value in resolved.items() if key != "axes"}
    if isinstance(kept.get("sources"), dict):
        kept["sources"] = {name: value for name, value in kept["sources"].items() if name in sources}
    base = kept.get("base")
    if isinstance(base, dict) and isinstance(base.get("runtime"), dict):
        runtime = {k: v for k, v in base["runtime"].items() if f"runtime.{k}" not in SAME_RESULT_KEYS}
        kept["base"] = {**base, "runtime": runtime}
    return kept


def refuse_changed_config(out: Path, resolved: str) -> None:
    """A grid's finished runs belong to the config that made them: rerunning into `out` with settings other
    than the axes changed would report them as the new config's (only the axes may grow or shrink, and the
    runtime settings `summarize` also lets differ may change)."""
    saved = out / "compare.yaml"
    if not saved.exists():
        return
    raw = [yaml.safe_load(text) or {} for text in (saved.read_text(), resolved)]
    known = set((raw[0].get("sources") or {}))  # every source the grid was made with, used then or not
    before, now = (_result_settings(r, known & _used_sources(raw[1])) for r in raw)
    diffs = input_differences(before, now)
    if diffs:
        raise ConfigError(f"{out} holds a grid made with another config ({'; '.join(diffs[:5])}"
                          f"{'; ...' if len(diffs) > 5 else ''}); its finished arms would be reported as this "
                          "config's. Use a new --out (a change to the axes alone extends the grid in place; where "
                          "the file did not change, a default of this version differs from the one that made it)")


def _used_sources(resolved: dict) -> set[str]:
    return set(((resolved.get("axes") or {}).get("init") or []))


def recorded_yaml(out: Path, resolved: str) -> str:
    """What OUT/compare.yaml keeps: the resolved config, with the saved definitions of sources it no longer
    uses (their runs stay on disk: dropping a source, changing it and adding it back must still be refused)."""
    saved = out / "compare.yaml"
    if not saved.exists():
        return resolved
    before, now = (yaml.safe_load(text) or {} for text in (saved.read_text(), resolved))
    sources = dict(now.get("sources") or {})
    for name, definition in (before.get("sources") or {}).items():
        if name not in _used_sources(now):
            sources[name] = definition
    return yaml.safe_dump({**now, "sources": sources}, sort_keys=False)


def grid_root(out: Path) -> tuple[Path, str | None]:
    """(`--out` as the grid's runs name it, the spelling they name that no longer leads here or None). Each run
    records its paths as they were typed, so `rel` and `/abs/rel` were two grids to them (every unfinished arm
    refused): a grid keeps the spelling it was started with, where that still leads here; a new grid takes the
    absolute path. A grid moved or copied since is read where it is (its finished arms can be reported)."""
    started = _started_spelling(out) if (out / "compare.yaml").exists() else None
    if started is None:
        return out.absolute(), None
    if Path(started).resolve() != out.resolve():
        return out.absolute(), started
    return Path(started), None


def refuse_moved_grid(out: Path, started: str, pending: int) -> None:
    """Jobs still to run in a moved grid would start from paths of its old place."""
    where = (f"which does not lead here from {Path.cwd()} (run compare from the directory it was started in)"
             if not Path(started).is_absolute() else "where it was made (moved or copied since)")
    raise ConfigError(f"{out} holds a grid whose runs name their paths from {started!r}, {where}; its finished "
                      f"arms can be reported, but its {pending} unfinished job(s) would read from there: move it "
                      "back, or start a new --out")


def _started_spelling(out: Path) -> str | None:
    """The `--out` a grid's runs were made with: their import's path is OUT/data/<labels-seed>/data."""
    for config_path in sorted(out.glob("arms/*/config.yaml")) + sorted(out.glob("pretrain/*/config.yaml")):
        data = (yaml.safe_load(config_path.read_text()) or {}).get("data") or {}
        parts = PurePath(str(data.get("path") or "")).parts
        if len(parts) >= 3 and parts[-1] == "data" and parts[-3] == "data":
            return str(PurePath(*parts[:-3]))
    return None


def run_compare(config: CompareConfig, out: str | Path, only: str | None = None, dry_run: bool = False,
                estimate: bool = True, keep_going: bool = False) -> dict | None:
    """Run the grid's pending jobs in order, then report. A failed job stops the grid (the finished arms are
    reported, marked partial); `keep_going`: the other jobs run first, and `JobsFailed` names the failed ones."""
    out, moved_from = grid_root(Path(out))
    plan = make_plan(config, out, only)
    pending = plan.pending()  # what is left before this invocation runs anything
    if moved_from is not None and pending:
        refuse_moved_grid(out, moved_from, len(pending))
    state = process_state()
    try:
        check_same_settings(state, {**to_dict(config), "--only": only})
        refuse_foreign_out(out)  # on every rank, so that all stop together; before --dry-run's plan too
        refuse_changed_config(out, resolved_yaml(config))
        if not keep_going:
            refuse_unusable_job_dirs(pending, out)
        if state.is_main_process:
            print(describe_plan(config, plan, measured_rate(config) if estimate and pending else None),
                  flush=True)
        if dry_run:
            return None
        if state.is_main_process:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise WriteFailed(f"--out {out}: cannot create it ({exc.strerror}); nothing was run") from None
            write_text(out / "compare.yaml", recorded_yaml(out, resolved_yaml(config)))
        failed = run_jobs(config, pending, out, state, keep_going)
        summary = None
        if failed:
            report_partial(config, out, state, failed)
        elif state.is_main_process:
            summary = write_report(config, out)
        state.wait_for_everyone()
        if failed:
            raise JobsFailed(f"{len(failed)} of {len(pending)} job(s) failed: " + "; ".join(failed)
                             + ". Rerun the same command to retry them (what finished is kept)")
        return summary
    finally:
        end_processes(state)


class JobsFailed(RuntimeError):
    """`--keep-going`: the grid ran every job it could; these failed (each error was printed when it happened)."""


def run_jobs(config: CompareConfig, pending: list[Job], out: Path, state, keep_going: bool) -> list[str]:
    """Each pending job in order; returns the failed ones (`keep_going`). Without it, or where the processes
    cannot go on together (one failed inside a collective the others were in), the first failure is raised
    after the finished arms are reported, marked partial."""
    seconds: dict[str, list[float]] = {}
    failed: list[str] = []
    for index, job in enumerate(pending, 1):
        state.print(f"[compare {index}/{len(pending)}{eta(seconds, pending[index - 1:])}] "
                    f"{job.kind}/{job.name} -> {job.target}", flush=True)
        started = time.time()
        try:
            run_up_to(job.config, job.run_dir(out), job.target, state)
        except Exception as error:
            state.print(f"compare: job {job.kind}/{job.name} stopped (its run: {job.run_dir(out)}). The error "
                        "speaks of one run: its settings are the compare config's base.* keys, and --from / "
                        "--run-dir are not compare's (delete that run's directory to redo it; a changed config "
                        "needs a new --out)", file=sys.stderr, flush=True)
            stopped = f"{job.kind}/{job.name} failed ({type(error).__name__}: {error})"
            if keep_going and (state.num_processes == 1 or raised_on_every_rank(error)):
                state.print(f"selftrain: error: {error}\ncompare: --keep-going: on to the next job", file=sys.stderr,
                            flush=True)
                failed.append(stopped)
                continue
            report_partial(config, out, state, failed + [stopped])
            if raised_on_every_rank(error):  # the others wait for that report: their exit makes the launcher
                state.wait_for_everyone()    # stop process 0, which could be writing it
            raise
        seconds.setdefault(job.kind, []).append(time.time() - started)
    return failed


def report_partial(config: CompareConfig, out: Path, state, stopped: list[str]) -> None:
    """The report of the arms finished so far, marked partial (or an earlier report marked as not this grid's)."""
    with contextlib.suppress(Exception):  # the jobs' errors are the ones to show
        if state.is_main_process and finished_arms(config, out):
            write_report(config, out, partial="; ".join(stopped))
        elif state.is_main_process:
            mark_report_stale(out / "report" / "report.md", "; ".join(stopped))


def mark_report_stale(report: Path, stopped: str) -> None:
    """No arm of this grid has finished: a report there is an earlier invocation's, and says so under its title."""
    if report.exists():
        title, _, rest = report.read_text().partition("\n")
        write_text(report, f"{title}\n\n**Not this grid's report**: written by an earlier run of other axes; in the "
                           f"last run {stopped} before any of its arms finished.\n{rest}")


def write_report(config: CompareConfig, out: Path, partial: str | None = None) -> dict:
    """OUT/report from every finished arm; `partial`: the grid stopped there, and the report says so."""
    results = [arm_result(config, arm, out) for arm in finished_arms(config, out)]
    report_dir = out / "report"
    budget = (f"Every arm's final model trained {config.budget.steps} optimizer steps at "
              f"{config.budget.batch_size} labeled images a step (checked per arm).")
    summary = write_compare_report(report_dir, results, provenance(), resolved_yaml(config), budget,
                                   {name: source.kind for name, source in config.sources.items()})
    if partial:  # said under the title: a reader must not take it for the whole grid
        title, _, rest = (report_dir / "report.md").read_text().partition("\n")
        write_text(report_dir / "report.md", f"{title}\n\n**Partial grid**: {len(results)} arms finished; not "
                                             f"finished: {partial}. Rerun the same command to resume it.\n{rest}")
    write_json(report_dir / "metrics.json", {**summary, **({"partial": partial} if partial else {})})
    print(f"report{' (partial)' if partial else ''}: {report_dir / 'report.md'}")
    return summary
