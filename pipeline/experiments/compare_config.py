"""The `selftrain compare` config: a base pipeline config, the axes of the grid, the pretraining
sources, and the one training budget every arm gets.

    base:            a pipeline config (data, teacher, student, select, ... as for `selftrain run`)
    budget:          {steps, batch_size}: optimizer steps and labeled images per step of each arm's
                     final model (the teacher without self-training, the student with it)
    sources:         named pretraining sources: supervised (another labeled data set), simclr (on the
                     unlabeled pool), checkpoint (a directory or weights file), timm (published weights)
    axes:            init (names of sources, or "random"), self_training (off/on), policy (s1..s4),
                     labels_per_class, seeds
    self_training:   rounds (the selection and student settings come from `base`)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from augment.spec import parse_policy
from pipeline.config.schema import ConfigError, bounds, from_dict, load_yaml, read_config_text
from pipeline.config.sections import Config, DataConfig, PretrainConfig, SSLPretrainConfig, TrainConfig

RANDOM = "random"


@dataclass(frozen=True)
class Budget:
    steps: int = field(default=150, metadata=bounds(ge=1))
    batch_size: int = field(default=64, metadata=bounds(ge=1))


@dataclass(frozen=True)
class SourceConfig:
    """One pretraining source; shared by every arm that starts from it (trained once, seed 0)."""

    kind: Literal["supervised", "simclr", "checkpoint", "timm"]
    data: DataConfig | None = None  # supervised: the labeled source data set
    # supervised / simclr: how long and how; keys left out take the pretrain / ssl_pretrain stage's own defaults
    train: TrainConfig | None = None
    path: str | None = None  # checkpoint: a checkpoint directory or weights file; timm: the weights' name
    temperature: float = field(default=0.2, metadata=bounds(gt=0))  # simclr


@dataclass(frozen=True)
class Axes:
    init: tuple[str, ...] = (RANDOM,)
    self_training: tuple[bool, ...] = (False, True)  # YAML off/on
    policy: tuple[str, ...] = ("s1", "s4")
    labels_per_class: tuple[int, ...] = (20, 200)
    seeds: tuple[int, ...] = (0, 1)


@dataclass(frozen=True)
class SelfTrainingAxis:
    rounds: int = field(default=1, metadata=bounds(ge=1))


@dataclass(frozen=True)
class CompareConfig:
    base: dict[str, Any] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    axes: Axes = field(default_factory=Axes)
    self_training: SelfTrainingAxis = field(default_factory=SelfTrainingAxis)

    def base_config(self) -> Config:
        return from_dict(Config, self.base, "base")


def check(config: CompareConfig) -> None:
    """What the schema cannot see: every init named, sources complete, axes non-empty and unique."""
    for name, values in vars(config.axes).items():
        if not values:
            raise ConfigError(f"axes.{name}: empty; give at least one value")
        if len(set(values)) != len(values):
            raise ConfigError(f"axes.{name}: {list(values)} repeats a value")
    for name, values, least in (("seeds", config.axes.seeds, 0), ("labels_per_class", config.axes.labels_per_class, 1)):
        if any(value < least for value in values):
            raise ConfigError(f"axes.{name}: {list(values)}: each must be >= {least}")
    for init in config.axes.init:
        if init != RANDOM and init not in config.sources:
            raise ConfigError(f"axes.init: {init!r} is neither 'random' nor a name under sources "
                              f"({', '.join(config.sources) or 'none defined'})")
    for name, source in config.sources.items():
        if source.kind == "supervised" and source.data is None:
            raise ConfigError(f"sources.{name}: kind supervised needs data (the labeled source data set)")
        if source.kind in ("checkpoint", "timm") and not source.path:
            raise ConfigError(f"sources.{name}: kind {source.kind} needs path "
                              + ("(a checkpoint directory or weights file)" if source.kind == "checkpoint"
                                 else "(timm weights, e.g. resnet18.a1_in1k)"))
    for policy in config.axes.policy:
        try:
            TrainConfig(policy=policy)
        except ValueError as exc:
            raise ConfigError(f"axes.{exc}") from None
    same = same_policies(config.axes.policy)
    if same:
        raise ConfigError(f"axes.policy: {' and '.join(same)} are one policy (defaults filled in: "
                          f"{parse_policy(same[0])}); its arms would train the same models and count twice")
    check_archs(config)


def same_policies(policies: tuple[str, ...]) -> list[str]:
    """The first group of spellings that parse to one policy ('s4', 'S4', 's4-n2-m10'), or []."""
    groups: dict[str, list[str]] = {}
    for policy in policies:
        groups.setdefault(str(parse_policy(policy)), []).append(policy)
    return next((group for group in groups.values() if len(group) > 1), [])


def check_archs(config: CompareConfig) -> None:
    """The base models' architectures exist, checked as `selftrain run`'s preflight does (with the closest
    names), before the plan is made or `--dry-run`'s speed probe builds the teacher. The base `init` is not
    checked: every arm sets its own."""
    from teachers.models import ModelError, check_arch  # torch and timm, imported only when checking

    base = config.base_config()
    models = [("base.teacher.model", base.teacher.model)]
    if True in config.axes.self_training:
        models.append(("base.student.model", base.student.model))
    for where, model in models:
        try:
            check_arch(model.arch)
        except ModelError as exc:
            raise ConfigError(f"{where}.arch: {exc}") from None
    check_read_sources(config, base.teacher.model.arch)


def check_read_sources(config: CompareConfig, arch: str) -> None:
    """Sources read, not trained: timm weights of the teacher's architecture in the local cache, a checkpoint
    directory (its weights those its meta.json records) or weights file that exists. A typo or a missing cache is
    refused before the first arm, not after the arms run before it."""
    from pipeline.engine.init import TIMM_PREFIX, check_init_exists
    from teachers.init_sources import InitError
    from teachers.models import ModelError

    for name, source in config.sources.items():
        if source.kind in ("timm", "checkpoint") and name in config.axes.init:
            prefix = TIMM_PREFIX if source.kind == "timm" else ""
            try:
                check_init_exists(f"{prefix}{source.path}", arch, f"sources.{name}.path")
            except (InitError, ModelError) as exc:
                raise ConfigError(str(exc)) from None


def with_stage_train_defaults(config: CompareConfig, raw_sources: Any) -> CompareConfig:
    """A source's `train` keys laid over its stage's defaults (`pretrain.train`, `ssl_pretrain.train`), as a run
    config's section would be, not over TrainConfig's: `{steps: 300}` gave SimCLR s1 views and SGD at lr 0.1."""
    stage_train = {"supervised": PretrainConfig().train, "simclr": SSLPretrainConfig().train}
    sources = dict(config.sources)
    for name, source in config.sources.items():
        given = raw_sources[name].get("train") if isinstance(raw_sources[name], dict) else None
        if given is not None and source.kind in stage_train:
            base = stage_train[source.kind]
            if isinstance(given, dict) and given.get("steps") is not None:  # epochs unused: kept as grids made
                base = dataclasses.replace(base, epochs=TrainConfig().epochs)  # before this change resolved it
            train = from_dict(TrainConfig, given, f"sources.{name}.train", base=base)
            sources[name] = dataclasses.replace(source, train=train)
    return dataclasses.replace(config, sources=sources)


def load_compare_config(path: str | Path) -> CompareConfig:
    path = Path(path)
    try:
        raw = load_yaml(read_config_text(path, "compare config"), str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: empty or not a mapping; see configs/compare_fashion_mnist.yaml")
    try:
        config = with_stage_train_defaults(from_dict(CompareConfig, raw), raw.get("sources"))
        check(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config
