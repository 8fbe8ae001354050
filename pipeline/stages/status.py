"""`selftrain status`: each stage of a run directory and its state, without importing torch.

The runner writes the run's stage names (RUN/stages.json) beside its config, so listing them needs
neither the stage graph nor the stage modules it imports (torch, timm: about 5 s). A run directory
made before stages.json existed is listed from its config through the graph, as before.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.rundir import RunDir


def stage_names(run: RunDir) -> list[str]:
    planned = run.planned_stages()
    if planned is not None:
        return planned
    from pipeline.config.loading import load_config
    from pipeline.stages.graph import build_graph

    if not run.config_path.exists():
        return []  # no stage has run yet (a first run refused before its first stage): no config to list
    return build_graph(load_config(run.config_path)).names


def describe(run_dir: str | Path) -> list[tuple[str, str]]:
    """(stage, state) for every stage of the run directory, in run order."""
    run = RunDir(run_dir)
    run.require_run_dir()
    return [(name, run.stage_state(name)) for name in stage_names(run)]
