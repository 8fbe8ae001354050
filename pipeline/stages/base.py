"""What a stage is: a name, a kind, what it needs, what its result depends on, and how it runs.

The stage graph (`pipeline.stages.graph`) is the only place that creates stages and
names them; everything else (runner, status, report, summaries) reads `Stage` fields
and never parses a stage name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from accelerate import PartialState

from pipeline.config.sections import Config
from pipeline.core.rundir import RunDir, RunDirError
from pipeline.data.imageset import DataInfo, open_data

StageKind = Literal["data", "pretrain", "ssl_pretrain", "teacher", "pseudo_label", "select", "student", "distill", "prune", "export", "report"]
TRAINING_KINDS: tuple[StageKind, ...] = ("pretrain", "ssl_pretrain", "teacher", "student", "distill", "prune")


@dataclass(frozen=True)
class Stage:
    name: str  # its directory under the run directory
    kind: StageKind
    run: Callable[["StageContext", "Stage"], object]
    # what the stage's result depends on (hashed into stage.json); None: never skipped, never refused
    inputs: Callable[["StageContext", "Stage"], dict] | None = None
    needs: tuple[str, ...] = ()  # stages that must be done before this one runs
    round: int | None = None  # Noisy Student round (pseudo-label, select, student)
    teacher: str | None = None  # stage whose checkpoint is this stage's teacher
    teacher_path: str | None = None  # or a checkpoint directory given in the config
    labels: str | None = None  # pseudo-label stage whose sidecars this stage reads
    selection: str | None = None  # select stage whose plans this stage reads
    main_process_only: bool = False  # other ranks wait at the barrier after it
    spec: Any = None  # the config item this stage was made from (one distill student)
    source: str | None = None  # the stage whose checkpoint this stage starts from (prune)

    @property
    def trains_model(self) -> bool:
        return self.kind in TRAINING_KINDS

    @property
    def fingerprinted(self) -> bool:
        return self.inputs is not None


@dataclass(frozen=True)
class StageGraph:
    """Stages in a valid run order (every stage after the stages it needs)."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for stage in self.stages:
            missing = [n for n in stage.needs if n not in seen]
            if missing or stage.name in seen:
                raise ValueError(f"stage graph: '{stage.name}' is duplicated or needs {missing} declared after it")
            seen.add(stage.name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def get(self, name: str, flag: str = "stage") -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RunDirError(f"{flag} {name!r}: unknown stage; stages are {', '.join(self.names)}")

    def of_kind(self, *kinds: StageKind) -> list[Stage]:
        return [s for s in self.stages if s.kind in kinds]

    def downstream(self, name: str) -> list[Stage]:
        """`name` and every stage that needs it, directly or not, in run order."""
        affected = {self.get(name).name}
        for stage in self.stages:
            if any(n in affected for n in stage.needs):
                affected.add(stage.name)
        return [s for s in self.stages if s.name in affected]

    def upstream(self, name: str) -> list[Stage]:
        """`name` and every stage it needs, directly or not, in run order."""
        needed = {self.get(name).name}
        for stage in reversed(self.stages):
            if stage.name in needed:
                needed.update(stage.needs)
        return [s for s in self.stages if s.name in needed]

    def select(self, only: str | None, start: str | None) -> list[Stage]:
        """The stages an invocation runs: all, `--only` one, or `--from` one and its downstream."""
        if only and start:
            raise RunDirError("use either --only or --from, not both")
        if only:
            return [self.get(only, "--only")]
        if start:
            self.get(start, "--from")
            return self.downstream(start)
        return list(self.stages)


@dataclass
class StageContext:
    """What a stage runs with: the config, the run directory, the one process state, the graph."""

    config: Config
    run: RunDir
    state: PartialState
    graph: StageGraph
    _data: DataInfo | None = field(default=None, repr=False)

    def data(self) -> DataInfo:
        """The imported data (opened once, after the data stage has run)."""
        if self._data is None:
            self._data = open_data(self.run.data_dir)
        return self._data

    def recorded_inputs(self, stage: Stage) -> dict:
        """The inputs the stage's stage.json recorded ({} before its first start): lets a stage keep a field
        it no longer fingerprints as recorded, so runs made before still match."""
        return (self.run.stage_record(stage.name) or {}).get("inputs", {})

    def fingerprints(self, stage: Stage, key: str) -> bool:
        """Whether the stage's inputs include `key`, a key added since some runs were made: yes for a stage not
        started yet, and for one whose record has it; a record made before keeps matching without it."""
        recorded = self.recorded_inputs(stage)
        return not recorded or key in recorded

    def teacher_dir(self, stage: Stage) -> Path:
        if stage.teacher_path is not None:
            return Path(stage.teacher_path)
        if stage.teacher is None:
            raise RunDirError(f"stage '{stage.name}' has no teacher")
        return self.run.checkpoint_dir(stage.teacher)
