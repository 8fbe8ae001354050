"""`selftrain summarize RUN...`: mean +- std of each stage over several runs (e.g. seeds).

Reads the metrics.json of every stage in each run directory; prints one Markdown
table: test top-1 (and holdout top-1 where the import has a holdout), the gain of
each student round over the same run's teacher and of each distilled or pruned student over the
teacher it was taught by, the pseudo-labels' accuracy, and wall time per stage.
Spread is the sample standard deviation (n-1) over the runs that have the stage.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from pipeline.config.loading import load_config
from pipeline.config.schema import to_dict
from pipeline.config.sections import Config
from pipeline.core.atomic import read_json, read_json_object
from pipeline.stages.data_import import READ_BY_SOURCE
from pipeline.core.rundir import RunDir, RunDirError, flatten_keys
from pipeline.stages.base import Stage
from pipeline.stages.graph import build_graph
from pipeline.stages.report import stage_wall_seconds

# the first line of every table file summarize writes: `--out` replaces only a file that starts with it
FILE_MARK = "<!-- written by selftrain summarize -->"


def is_summary_file(path: Path) -> bool:
    """Whether `path` is a table an earlier `selftrain summarize --out` wrote (its first line is FILE_MARK)."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(len(FILE_MARK) + 2)
    except OSError:
        return False
    return first.rstrip(b"\r\n") == FILE_MARK.encode()


def summary_file_text(table: str) -> str:
    """The table as written to `--out`: FILE_MARK (an HTML comment, invisible in rendered Markdown), then the table."""
    return f"{FILE_MARK}\n{table}\n"


def run_stages(run_dir: Path) -> list[Stage]:
    """The run's stage graph, from the config it was run with (RUN/config.yaml; the defaults without one)."""
    run = RunDir(run_dir)
    run.require_run_dir()
    config = load_config(run.config_path) if run.config_path.exists() else Config()
    return list(build_graph(config).stages)


def run_metrics(run_dir: Path) -> dict[str, dict]:
    """{stage: metrics (+ "wall_seconds" over all invocations)} for the finished stages of one run."""
    run = RunDir(run_dir)
    found = {}
    for stage in run_stages(run_dir):
        if stage.kind != "report" and run.is_done(stage.name):
            path = run.metrics_path(stage.name)
            metrics = read_json_object(path) if path.exists() else {}
            found[stage.name] = {**metrics, "kind": stage.kind,
                                 "wall_seconds": stage_wall_seconds(run, stage.name, metrics)}
    if "teacher" not in found:
        raise RunDirError(f"{run_dir}: no finished teacher stage (teacher/DONE); nothing to summarize")
    return found


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# what may differ between the runs of one summary: the seeds, and settings that do not change results on CPU
SAME_RESULT_KEYS = ("seed", "data.seed", "select.seed", "pretrain.data.seed", "runtime.workers", "runtime.threads",
                    "runtime.progress", "runtime.log_with", "runtime.dist_timeout_minutes",
                    "runtime.peer_timeout_s")


def flat_configs(run_dirs: list[Path]) -> dict[Path, dict]:
    """Each run's config as `{"a.b": value}`, read once (runs without a config.yaml left out)."""
    return {d: flatten_keys(to_dict(load_config(RunDir(d).config_path))) for d in run_dirs
            if RunDir(d).config_path.exists()}


# a compare arm's import: one per (labels, seed), so the seeds of one arm read OUT/data/l{N}-s{seed}/data
SEED_IMPORT = re.compile(r"([/\\]data[/\\]l\d+-s)\d+([/\\]data)$")


def config_differences(configs: dict[Path, dict]) -> list[str]:
    """Config keys other than SAME_RESULT_KEYS whose values differ between the runs (`key (a / b)`): a mean
    over such runs is not a mean over seeds. A compare arm's per-seed import path is a seed, not a difference."""
    flat = list(configs.values())
    keys = dict.fromkeys(k for c in flat for k in c)

    def compared(key: str, value: object) -> str:
        return SEED_IMPORT.sub(r"\1*\2", str(value)) if key == "data.path" else repr(value)

    def unread(key: str) -> bool:  # a data setting no run's source reads (an import's own splits under shards)
        sources = {c.get("data.source") for c in flat}
        return key.startswith("data.") and all(key.split(".")[1] not in READ_BY_SOURCE.get(str(s), (key.split(".")[1],))
                                               for s in sources)
    return [f"{key} ({' / '.join(str(c.get(key)) for c in flat)})" for key in keys
            if key not in SAME_RESULT_KEYS and not unread(key) and len({compared(key, c.get(key)) for c in flat}) > 1]


SEED_KEYS = ("seed", "data.seed", "select.seed")


def repeated_seeds(configs: dict[Path, dict]) -> list[list[Path]]:
    """Groups of runs made with the same seeds (a copy, or the same seed rerun elsewhere): their spread is
    not a spread over seeds."""
    groups: dict[tuple, list[Path]] = {}
    for d, flat in configs.items():
        groups.setdefault(tuple(flat.get(k) for k in SEED_KEYS), []).append(d)
    return [group for group in groups.values() if len(group) > 1]


def repeated_seeds_note(groups: list[list[Path]]) -> list[str]:
    return [f"**Note: runs with the same seeds** ({', '.join(SEED_KEYS)}): "
            + "; ".join(" = ".join(str(d) for d in group) for group in groups)
            + ". Their results are not independent draws; a spread over them is not a spread over seeds.", ""
            ] if groups else []


def differences_note(differ: list[str], shown: int = 8) -> list[str]:
    """The lines above the table when the runs differ in more than their seeds (none when they do not)."""
    if not differ:
        return []
    more = f" and {len(differ) - shown} more keys" if len(differ) > shown else ""
    return [f"**Note: these runs differ in more than their seeds**: {'; '.join(differ[:shown])}{more}", ""]


def refuse_repeated_runs(run_dirs: list[Path]) -> None:
    """One run given twice (`run1 /abs/run1`) would count as two seeds with the same result."""
    seen: dict[Path, Path] = {}
    for directory in run_dirs:
        resolved = directory.resolve()
        if resolved in seen:
            raise RunDirError(f"{seen[resolved]} and {directory} are one run directory, given twice; "
                              "each run counts once")
        seen[resolved] = directory


def summary_table(run_dirs: list[Path]) -> str:
    refuse_repeated_runs([Path(d) for d in run_dirs])
    runs = [run_metrics(Path(d)) for d in run_dirs]
    configs = flat_configs([Path(d) for d in run_dirs])
    stages = [s for s in dict.fromkeys(s for r in runs for s in r)]  # run order; longer runs add later rounds
    lines = [f"{len(runs)} run{'s' if len(runs) != 1 else ''}: " + ", ".join(str(d) for d in run_dirs), "",
             *differences_note(config_differences(configs)),
             *repeated_seeds_note(repeated_seeds(configs)),
             "| stage | runs | test top-1 % | gain over teacher (points) | holdout top-1 % | pseudo-label acc % "
             "| wall s | per run test top-1 % |", "|" + "---|" * 8]
    for stage in stages:
        have = [r for r in runs if stage in r]
        top1 = [100 * r[stage]["top1"] for r in have if "top1" in r[stage]]
        gain = [g for g in (gain_points(r, stage) for r in have) if g is not None]
        held = [100 * r[stage]["holdout"]["top1"] for r in have if "holdout" in r[stage]]
        pool = [a for a in (pseudo_label_accuracy(r[stage]) for r in have) if a is not None]
        wall = [r[stage]["wall_seconds"] for r in have if r[stage]["wall_seconds"] is not None]
        cells = [stage, str(len(have)), mean_std(top1), mean_std(gain), mean_std(held), mean_std(pool),
                 f"{statistics.mean(wall):.0f}" if wall else "", " / ".join(f"{v:.2f}" for v in top1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Gain: a student round over its run's teacher stage; a distilled or pruned student over the teacher "
              "it was taught by (the ensemble, when it had one). Pseudo-label accuracy: of the whole labeled pool "
              "(pseudo_label), of the selected copies the student trains on (select); hidden true labels, "
              "never used for training."]
    return "\n".join(lines)


def gain_points(run: dict[str, dict], stage: str) -> float | None:
    """Points over the teacher that matters for the stage's kind (None when it has none or no top-1)."""
    metrics = run[stage]
    if "top1" not in metrics:
        return None
    if metrics["kind"] == "student":
        return 100 * (metrics["top1"] - run["teacher"]["top1"])
    taught_by = metrics.get("ensemble_top1", metrics.get("teacher_top1"))
    if metrics["kind"] in ("distill", "prune") and taught_by is not None:
        return 100 * (metrics["top1"] - taught_by)
    return None


def pseudo_label_accuracy(metrics: dict) -> float | None:
    """Percent of pseudo-labels that match the pool's hidden labels: the pool's (pseudo_label stages) or the
    selected copies' (select stages)."""
    if "pool_accuracy" in metrics:
        return 100 * metrics["pool_accuracy"]
    selected = metrics.get("selected_accuracy", {}).get("weighted_by_copies")
    return None if selected is None else 100 * selected
