"""The numbers of a `selftrain compare` grid: arm results, mean/std/SE, paired per-seed gains, tables, summary.csv.

Spread is the sample standard deviation (n-1) over seeds. Gains are paired per seed (same policy, labels and
seed), so seed-to-seed variation shared by both arms cancels. A difference is significant when a two-sided
one-sample t-test of the paired differences gives p < 0.05 (t = mean / SE, SE = sample std / sqrt(n), n-1
degrees of freedom: with 2 seeds |t| must pass 12.7, not 2); with n=1 the SE is undefined. A family of
cells tested together ("in some cell", "in every cell") is corrected with Holm's step-down method.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from scipy.stats import t as student_t

from augment import PolicyError, parse_policy
from pipeline.core.atomic import ArtifactError

BASELINE = "random"
SUPERVISED = "supervised"
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
ALPHA = 0.05  # two-sided significance level of every test
POLICY_STRENGTH = {"s1": 1, "s2": 2, "s3": 3, "s4": 4}
STRONG_POLICIES = ("s3", "s4")
ACCURACY_PNG = "accuracy_vs_policy.png"
GAIN_PNG = "gain_vs_labels.png"

Arm = tuple[str, str]  # (init, self_training)

@dataclass(frozen=True)
class ArmResult:
    init: str
    self_training: str
    policy: str
    labels_per_class: int
    seed: int
    top1: float  # test top-1 in [0, 1]
    steps: int  # optimizer steps of the final model (equal across arms: the budget)
    wall_seconds: float  # wall time of this arm (its own stages)



@dataclass(frozen=True)
class Stat:
    """Mean and spread of n values; std and se are None when n < 2."""

    n: int
    mean: float
    std: float | None
    se: float | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def describe(values: Sequence[float]) -> Stat:
    if not values:
        raise ValueError("describe() needs at least one value")
    if len(values) == 1:
        return Stat(1, float(values[0]), None, None)
    std = statistics.stdev(values)
    return Stat(len(values), statistics.mean(values), std, std / math.sqrt(len(values)))


def p_value(stat: Stat) -> float | None:
    """Two-sided p of the one-sample t-test of mean 0; None when the SE is undefined: n = 1, or differences
    that are all the same (t is infinite; with few seeds and test sets that move accuracy in coarse steps that
    happens by chance, so it is no evidence either way)."""
    if stat.se is None or stat.se <= 1e-12:
        return None
    return float(2 * student_t.sf(abs(stat.mean) / stat.se, stat.n - 1))


def _sign(stat: Stat) -> int:
    return 1 if stat.mean > 0 else -1


def significance(stat: Stat) -> int | None:
    """+1 / -1 when p < ALPHA (the sign of the mean), 0 when not, None when the SE is undefined."""
    p = p_value(stat)
    if p is None:
        return None
    return _sign(stat) if p < ALPHA else 0


def holm_significance(stats: Sequence[Stat]) -> list[int | None]:
    """`significance` of each of a family of tests, corrected with Holm's step-down method (the family-wise
    error stays at ALPHA however many cells are tested); None where the SE is undefined."""
    p = [p_value(s) for s in stats]
    tested = sorted((value, i) for i, value in enumerate(p) if value is not None)
    signs: list[int | None] = [None if value is None else 0 for value in p]
    for rank, (value, i) in enumerate(tested):
        if value >= ALPHA / (len(tested) - rank):
            break
        signs[i] = _sign(stats[i])
    return signs


def significance_text(stat: Stat, sign: int | None = None) -> str:
    """The test and its outcome; `sign` overrides the outcome (a Holm-corrected family)."""
    p = p_value(stat)
    if p is None:
        return "n=1, SE undefined" if stat.se is None else "every seed the same difference: SE 0, t undefined"
    sign = significance(stat) if sign is None else sign
    t = f"t = {stat.mean / stat.se:+.2f}"  # type: ignore[operator]  # p is None when the SE is
    outcome = {1: "significantly > 0", -1: "significantly < 0", 0: "not significant"}[sign]
    return f"{t}, {stat.n - 1} df, p = {p:.3f}: {outcome}"


def format_top1(stat: Stat) -> str:
    return f"{stat.mean:.2f}" if stat.std is None else f"{stat.mean:.2f} ± {stat.std:.2f}"


def format_gain(stat: Stat) -> str:
    if stat.std is None or stat.se is None:
        return f"{stat.mean:+.2f}"
    return f"{stat.mean:+.2f} ± {stat.std:.2f} (SE {stat.se:.2f})"


def evidence_number(stat: Stat, sign: int | None = None) -> str:
    return f"{format_gain(stat)}, n={stat.n} ({significance_text(stat, sign)})"


# ----------------------------------------------------------------------------------------------- the grid

def policy_kind(policy: str) -> str:
    """The base policy of a policy string ('s4' of 's4-n2-m6-j0.8:1.25'), or the string itself if unknown."""
    try:
        return parse_policy(policy).name
    except PolicyError:
        return policy.lower()


def policy_key(policy: str) -> tuple[int, int, float, float, str]:
    """Strength order: s1 < s2 < s3 < s4 by base policy; within one base policy fewer RandAugment ops, then a
    lower magnitude, then a narrower scale jitter (HI/LO) is weaker; unknown names after them."""
    try:
        spec = parse_policy(policy)
    except PolicyError:
        return len(POLICY_STRENGTH) + 1, 0, 0.0, 0.0, policy
    low, high = spec.jitter
    return POLICY_STRENGTH[spec.name], spec.num_ops or 0, spec.magnitude or 0.0, high / low, policy


def init_key(init: str) -> tuple[int, str]:
    return (0 if init == BASELINE else 1 if init == SUPERVISED else 2), init


def mode_key(mode: str) -> tuple[int, str]:
    return (0 if mode == "off" else 1 if mode == "on" else 2), mode


def is_ssl(init: str, source_kinds: Mapping[str, str] | None = None) -> bool:
    """A self-supervised init: a simclr-kind source of the compare config when the kinds are known,
    else (a summary.csv read alone) by its name."""
    if source_kinds is not None:
        return source_kinds.get(init) == "simclr"
    name = init.lower()
    return "simclr" in name or "ssl" in name


def arm_label(arm: Arm) -> str:
    init, mode = arm
    if mode == "off":
        return init
    if mode == "on":
        return f"{init} + self-training"
    return f"{init} (self-training {mode})"


class Grid:
    """The results indexed by arm and cell, top-1 in percentage points; the axes in the paper's order."""

    def __init__(self, results: Sequence[ArmResult]) -> None:
        self.points: dict[tuple[str, str, str, int, int], float] = {}
        for r in results:
            key = (r.init, r.self_training, r.policy, r.labels_per_class, r.seed)
            if key in self.points:
                raise ValueError(f"two results for the same arm and seed: init={r.init} self_training="
                                 f"{r.self_training} policy={r.policy} labels={r.labels_per_class} seed={r.seed}")
            self.points[key] = 100.0 * r.top1
        self.inits = sorted({k[0] for k in self.points}, key=init_key)
        self.modes = sorted({k[1] for k in self.points}, key=mode_key)
        self.policies = sorted({k[2] for k in self.points}, key=policy_key)
        self.labels = sorted({k[3] for k in self.points})
        self.seeds = sorted({k[4] for k in self.points})

    @property
    def pretrained(self) -> list[str]:
        return [i for i in self.inits if i != BASELINE]

    def arms(self) -> list[Arm]:
        present = {(k[0], k[1]) for k in self.points}
        return [(i, m) for i in self.inits for m in self.modes if (i, m) in present]

    def has_arm(self, arm: Arm) -> bool:
        return arm in self.arms()

    def values(self, arm: Arm, policy: str, labels: int) -> dict[int, float]:
        """{seed: top-1 %} of one arm in one cell."""
        return {s: self.points[(*arm, policy, labels, s)] for s in self.seeds
                if (*arm, policy, labels, s) in self.points}

    def paired(self, arm: Arm, base: Arm, policy: str, labels: int) -> dict[int, float]:
        """{seed: arm − base in points} over the seeds both have in this cell."""
        a, b = self.values(arm, policy, labels), self.values(base, policy, labels)
        return {s: a[s] - b[s] for s in a if s in b}


def gain_pairs(grid: Grid) -> list[tuple[Arm, Arm]]:
    """The paired comparisons the gains table shows: (arm, base)."""
    pairs = []
    for mode in ("off", "on"):
        if grid.has_arm((BASELINE, mode)):
            pairs += [((i, mode), (BASELINE, mode)) for i in grid.pretrained if grid.has_arm((i, mode))]
    pairs += [((i, "on"), (i, "off")) for i in grid.inits if grid.has_arm((i, "on")) and grid.has_arm((i, "off"))]
    return pairs


def pair_label(arm: Arm, base: Arm) -> str:
    a, b = (f"({x})" if " + " in x else x for x in (arm_label(arm), arm_label(base)))
    return f"{a} − {b}"


def top1_table(grid: Grid) -> dict[int, dict[str, dict[str, Stat]]]:
    """{labels: {arm label: {policy: Stat}}} over seeds; cells without results are absent."""
    table: dict[int, dict[str, dict[str, Stat]]] = {}
    for labels in grid.labels:
        table[labels] = {}
        for arm in grid.arms():
            row = {p: describe(list(v.values())) for p in grid.policies if (v := grid.values(arm, p, labels))}
            table[labels][arm_label(arm)] = row
    return table


def gains_table(grid: Grid) -> dict[int, dict[str, dict[str, Stat]]]:
    """{labels: {"arm − base": {policy: Stat of the paired per-seed differences}}}."""
    table: dict[int, dict[str, dict[str, Stat]]] = {}
    for labels in grid.labels:
        table[labels] = {}
        for arm, base in gain_pairs(grid):
            row = {p: describe(list(d.values())) for p in grid.policies if (d := grid.paired(arm, base, p, labels))}
            table[labels][pair_label(arm, base)] = row
    return table


# ----------------------------------------------------------------------------------------------- CSV

CSV_FIELDS = tuple(f.name for f in dataclasses.fields(ArmResult))


def results_csv(results: Sequence[ArmResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(r).items()})
    return buffer.getvalue()


def _parse(text: str | None, kind: object) -> object:
    if text is None:
        raise ValueError("missing value")
    if kind in ("int", int):
        return int(text)
    if kind in ("float", float):
        return float(text)
    return text


def load_results_csv(path: str | Path) -> list[ArmResult]:
    """The arms of a summary.csv written by `write_compare_report`."""
    types = {f.name: f.type for f in dataclasses.fields(ArmResult)}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [f for f in CSV_FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise ArtifactError(f"{path}: not a compare summary.csv (missing columns: {', '.join(missing)})")
        results = []
        for line, row in enumerate(reader, start=2):
            try:
                values = {k: _parse(row[k], types[k]) for k in CSV_FIELDS}
            except (TypeError, ValueError):
                raise ArtifactError(f"{path}, line {line}: a value is missing or not a number: {row}") from None
            results.append(ArmResult(**values))
    return results
