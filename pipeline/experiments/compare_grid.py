"""The compare grid as a plan: arms, and the jobs (selftrain runs) that make them, shared where possible.

    one import per (labels, seed)              OUT/data/l{N}-s{seed}         (stage `data`)
    one pretraining per trained source         OUT/pretrain/{source}         (stage `pretrain` / `ssl_pretrain`)
    one training run per (init, policy, labels, seed)   OUT/arms/{init}-{policy}-l{N}-s{seed}
        self-training off reads its `teacher`; on reads its last `student_r{R}` (same teacher)

Every job is a run directory of the ordinary pipeline, so a killed compare resumes like a killed run:
finished stages are skipped, a started one resumes from its last saved state.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.loading import load_config
from pipeline.config.schema import ConfigError
from pipeline.core.rundir import RunDir
from pipeline.config.sections import Config, PretrainConfig, SSLPretrainConfig, TrainConfig
from pipeline.experiments.compare_config import RANDOM, CompareConfig

MODE_NAMES = {False: "off", True: "on"}


@dataclass(frozen=True)
class Arm:
    init: str
    self_training: bool
    policy: str
    labels_per_class: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.init}-{MODE_NAMES[self.self_training]}-{self.policy}-l{self.labels_per_class}-s{self.seed}"

    @property
    def run_name(self) -> str:
        """The training run this arm reads (self-training off and on share it, and its teacher)."""
        return f"{self.init}-{self.policy}-l{self.labels_per_class}-s{self.seed}"

    def field(self, axis: str) -> str:
        values = {"init": self.init, "self_training": MODE_NAMES[self.self_training], "policy": self.policy,
                  "labels_per_class": str(self.labels_per_class), "seed": str(self.seed),
                  "seeds": str(self.seed)}
        if axis not in values:
            raise ConfigError(f"--only {axis}=...: unknown axis; axes are init, self_training, policy, "
                              "labels_per_class, seed")
        return values[axis]


@dataclass(frozen=True)
class Job:
    kind: str  # "data", "pretrain", "arm"
    name: str  # its run directory under OUT/<kind>/
    config: Config
    target: str  # the stage to run (with everything it needs)

    def run_dir(self, out: Path) -> Path:
        return out / self.kind / self.name


def expand(config: CompareConfig) -> list[Arm]:
    a = config.axes
    return [Arm(init, st, policy, labels, seed) for labels, init, st, policy, seed
            in itertools.product(a.labels_per_class, a.init, a.self_training, a.policy, a.seeds)]


def select_arms(arms: list[Arm], only: str | None) -> list[Arm]:
    """`--only 'policy=s4,init=random'`: the arms matching every filter."""
    if not only:
        return arms
    filters = []
    for part in only.split(","):
        if "=" not in part:
            raise ConfigError(f"--only {only!r}: expected AXIS=VALUE[,AXIS=VALUE...], e.g. policy=s4")
        axis, value = (x.strip() for x in part.split("=", 1))
        filters.append((axis, value))
    chosen = [arm for arm in arms if all(arm.field(axis) == value for axis, value in filters)]
    if not chosen:
        offered = "; ".join(f"{axis}: {', '.join(sorted({arm.field(axis) for arm in arms}))}"
                            for axis in dict.fromkeys(axis for axis, _ in filters))
        raise ConfigError(f"--only {only!r} matches no arm of the grid (its values: {offered})")
    return chosen


def data_job_name(labels: int, seed: int) -> str:
    return f"l{labels}-s{seed}"


def data_dir(out: Path, labels: int, seed: int) -> Path:
    return out / "data" / data_job_name(labels, seed) / "data"


def _with(config: Config, **sections) -> Config:
    return dataclasses.replace(config, **sections)


def _budget_train(train: TrainConfig, config: CompareConfig, policy: str) -> TrainConfig:
    return dataclasses.replace(train, policy=policy, steps=config.budget.steps, batch_size=config.budget.batch_size)


def data_job(config: CompareConfig, labels: int, seed: int) -> Job:
    base = config.base_config()
    data = dataclasses.replace(base.data, labels_per_class=labels, seed=seed)
    return Job("data", data_job_name(labels, seed), _with(base, data=data, seed=seed), "data")


def pretrain_job(config: CompareConfig, name: str, out: Path) -> Job | None:
    """The run that trains source `name` (None for sources that are read, not trained). SimCLR trains on
    one import's unlabeled pool: one pretraining per source, as in the paper."""
    source, base = config.sources[name], config.base_config()
    shared_data = dataclasses.replace(base.data, source="shards", path=str(pretrain_import(config, name, out)))
    if source.kind == "supervised":
        pretrain = PretrainConfig(data=source.data, train=source.train or PretrainConfig().train)
        return Job("pretrain", name, _with(base, data=shared_data, pretrain=pretrain, seed=0), "pretrain")
    if source.kind == "simclr":
        ssl = SSLPretrainConfig(enabled=True, train=source.train or SSLPretrainConfig().train,
                                temperature=source.temperature)
        return Job("pretrain", name, _with(base, data=shared_data, ssl_pretrain=ssl, seed=0), "ssl_pretrain")
    return None


def pretrain_import(config: CompareConfig, name: str, out: Path) -> Path:
    """The import source `name`'s pretraining reads: the one it was started on (its run's config.yaml), so
    that reordering or growing the axes later does not move it; else the first (labels, seed) import."""
    started = RunDir(out / "pretrain" / name).config_path
    if started.exists():
        recorded = Path(load_config(started).data.path)
        if recorded.exists():
            return recorded
    return data_dir(out, config.axes.labels_per_class[0], config.axes.seeds[0])


def init_path(config: CompareConfig, init: str, out: Path) -> str | None:
    """What an arm's `model.init` becomes."""
    if init == RANDOM:
        return None
    source = config.sources[init]
    if source.kind == "supervised":
        return str(out / "pretrain" / init / "pretrain" / "checkpoint")
    if source.kind == "simclr":
        return str(out / "pretrain" / init / "ssl_pretrain" / "checkpoint")
    return f"timm:{source.path}" if source.kind == "timm" else source.path


def final_stage(self_training: bool, rounds: int) -> str:
    return f"student_r{rounds}" if self_training else "teacher"


def arm_job(config: CompareConfig, arm: Arm, out: Path, with_self_training: bool) -> Job:
    """The training run of `arm.run_name`: teacher (and, when any of its arms self-trains, the rounds)."""
    base = config.base_config()
    init = init_path(config, arm.init, out)
    rounds = config.self_training.rounds if with_self_training else 0
    data = dataclasses.replace(base.data, source="shards", path=str(data_dir(out, arm.labels_per_class, arm.seed)),
                               labels_per_class=arm.labels_per_class, seed=arm.seed)
    teacher = dataclasses.replace(base.teacher, model=dataclasses.replace(base.teacher.model, init=init),
                                  train=_budget_train(base.teacher.train, config, arm.policy))
    student = dataclasses.replace(base.student, rounds=rounds,
                                  model=dataclasses.replace(base.student.model, init=init),
                                  train=_budget_train(base.student.train, config, arm.policy))
    distill = dataclasses.replace(base.distill, students=())
    job_config = _with(base, seed=arm.seed, data=data, teacher=teacher, student=student, distill=distill)
    return Job("arms", arm.run_name, job_config, final_stage(with_self_training, config.self_training.rounds))


def plan_jobs(config: CompareConfig, arms: list[Arm], out: Path) -> list[Job]:
    """Data imports, then pretraining, then one training run per shared teacher, in that order."""
    jobs: list[Job] = []
    needed_data = {(arm.labels_per_class, arm.seed) for arm in arms}
    if any(config.sources[a.init].kind in ("supervised", "simclr") for a in arms if a.init != RANDOM):
        needed_data.add((config.axes.labels_per_class[0], config.axes.seeds[0]))
    jobs += [data_job(config, labels, seed) for labels, seed in sorted(needed_data)]
    sources = sorted({a.init for a in arms if a.init != RANDOM})
    jobs += [job for name in sources if (job := pretrain_job(config, name, out)) is not None]
    runs: dict[str, list[Arm]] = {}
    for arm in arms:
        runs.setdefault(arm.run_name, []).append(arm)
    for members in runs.values():
        jobs.append(arm_job(config, members[0], out, any(a.self_training for a in members)))
    return jobs


FASHION_MNIST_CLASSES, FASHION_MNIST_TRAIN = 10, 60_000  # for estimates when a split's size is not configured


def _trained_images(train: TrainConfig, images_per_epoch: int) -> int:
    return train.steps * train.batch_size if train.steps is not None else train.epochs * images_per_epoch


def job_images(job: Job, finished: Callable[[str], bool] = lambda stage: False) -> int:
    """Images pushed through training by a job, for the cost estimate (epochs are counted with the
    configured labeled / pool sizes; an unbounded pool is taken as Fashion-MNIST's training split).
    `finished(stage)`: a stage of the job's run already done, which costs nothing more."""
    c = job.config
    if job.kind == "data":
        return 0
    if job.target == "pretrain":
        data = c.pretrain.data
        return _trained_images(c.pretrain.train,
                               data.labels_per_class * (len(data.classes or ()) or FASHION_MNIST_CLASSES))
    if job.target == "ssl_pretrain":
        return 2 * _trained_images(c.ssl_pretrain.train, c.data.max_unlabeled or FASHION_MNIST_TRAIN)
    images = 0 if finished("teacher") else c.teacher.train.total_steps(1) * c.teacher.train.batch_size
    rounds_left = sum(not finished(f"student_r{i}") for i in range(1, c.student.rounds + 1))
    per_round = c.student.train.total_steps(1) * c.student.train.batch_size * (1 + c.student.unlabeled_ratio)
    images += rounds_left * per_round
    return images
