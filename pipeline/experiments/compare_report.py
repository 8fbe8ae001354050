"""The report of a `selftrain compare` grid (Zoph et al. 2020, "Rethinking Pre-training and Self-training").

Axes: init ("random" is the baseline), self-training ("off"/"on"), augmentation policy (s1 < s2 < s3 < s4),
labels per class, seed. Writes into one directory:

- summary.csv: one row per arm (read back with `load_results_csv`);
- report.md: top-1 tables in the paper's shape, paired gains, verdicts on the paper's findings, plots,
  wall time per arm, the budget, provenance and the resolved config;
- accuracy_vs_policy.png and gain_vs_labels.png.

Statistics: spread is the sample standard deviation (n-1) over seeds. Gains are paired per seed (same
policy, labels and seed), so seed-to-seed variation shared by both arms cancels. A difference is
significant only when |mean| > 2 SE, SE = sample std of the paired differences / sqrt(n); with n=1 the SE
is undefined and the verdict is inconclusive.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt

from pipeline.core.atomic import ArtifactError, write_text
from pipeline.core.plots import save_figure

BASELINE = "random"
SUPERVISED = "supervised"
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
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
class Verdict:
    finding: str
    outcome: str  # REPRODUCED, NOT_REPRODUCED or INCONCLUSIVE
    evidence: str


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


def significance(stat: Stat) -> int | None:
    """+1 / -1 when |mean| > 2 SE (the sign of the mean), 0 when not, None when the SE is undefined."""
    if stat.se is None:
        return None
    if abs(stat.mean) > max(2 * stat.se, 1e-9):  # the floor: identical seeds give SE 0 and a rounding-error mean
        return 1 if stat.mean > 0 else -1
    return 0


def significance_text(stat: Stat) -> str:
    sign = significance(stat)
    if sign is None:
        return "n=1, SE undefined"
    return {1: "significantly > 0", -1: "significantly < 0", 0: "not significant (|mean| <= 2 SE)"}[sign]


def format_top1(stat: Stat) -> str:
    return f"{stat.mean:.2f}" if stat.std is None else f"{stat.mean:.2f} ± {stat.std:.2f}"


def format_gain(stat: Stat) -> str:
    if stat.std is None or stat.se is None:
        return f"{stat.mean:+.2f}"
    return f"{stat.mean:+.2f} ± {stat.std:.2f} (SE {stat.se:.2f})"


def _evidence_number(stat: Stat) -> str:
    return f"{format_gain(stat)}, n={stat.n}: {significance_text(stat)}"


# ----------------------------------------------------------------------------------------------- the grid

def policy_key(policy: str) -> tuple[int, str]:
    """Strength order s1 < s2 < s3 < s4; unknown policy names after them, by name."""
    return POLICY_STRENGTH.get(policy.lower(), len(POLICY_STRENGTH) + 1), policy


def init_key(init: str) -> tuple[int, str]:
    return (0 if init == BASELINE else 1 if init == SUPERVISED else 2), init


def mode_key(mode: str) -> tuple[int, str]:
    return (0 if mode == "off" else 1 if mode == "on" else 2), mode


def is_ssl(init: str) -> bool:
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


# ----------------------------------------------------------------------------------------------- verdicts

FINDING_A = "a. pretraining helps less as labels grow"
FINDING_B = "b. pretraining helps less as augmentation gets stronger"
FINDING_C = "c. pretraining can hurt with S3/S4"
FINDING_D = "d. self-supervised pretraining behaves like supervised"
FINDING_E = "e. self-training helps in every cell"
FINDING_F = "f. self-training stacks on top of pretraining"


def _outcome(sign: int | None) -> str:
    return REPRODUCED if sign == 1 else NOT_REPRODUCED if sign == -1 else INCONCLUSIVE


def _missing_gain_axes(grid: Grid, init: str) -> str | None:
    """Why the gain of `init` over random (self-training off) cannot be measured, or None."""
    if not grid.has_arm((BASELINE, "off")):
        return "no random init without self-training to compare against"
    if not grid.has_arm((init, "off")):
        return f"no {init} arms without self-training"
    return None


def _gain_trend(grid: Grid, init: str, finding: str, cells: list[tuple[tuple[str, int], tuple[str, int]]],
                ends: tuple[str, str], pairing: str) -> Verdict:
    """Gain over random at the `lo` cell minus at the `hi` cell, paired per seed, pooled over the cell pairs."""
    arm, base = (init, "off"), (BASELINE, "off")
    diffs: list[float] = []
    lo_gains: list[float] = []
    hi_gains: list[float] = []
    for lo, hi in cells:
        g_lo, g_hi = grid.paired(arm, base, *lo), grid.paired(arm, base, *hi)
        lo_gains += g_lo.values()
        hi_gains += g_hi.values()
        diffs += [g_lo[s] - g_hi[s] for s in g_lo if s in g_hi]
    if not diffs:
        return Verdict(finding, INCONCLUSIVE, f"no seed has {init} and random at both {ends[0]} and {ends[1]}")
    stat = describe(diffs)
    evidence = (f"gain of {init} over random (self-training off) at {ends[0]}: {format_gain(describe(lo_gains))}; "
                f"at {ends[1]}: {format_gain(describe(hi_gains))}; difference, paired per {pairing}: "
                f"{_evidence_number(stat)}")
    return Verdict(finding, _outcome(significance(stat)), evidence)


def verdict_labels(grid: Grid, init: str) -> Verdict:
    """(a) The gain of `init` over random shrinks from the smallest to the largest label count."""
    finding = f"{FINDING_A} ({init})"
    reason = _missing_gain_axes(grid, init)
    if reason is None and len(grid.labels) < 2:
        reason = f"only one label count ({grid.labels[0]} per class)"
    if reason:
        return Verdict(finding, INCONCLUSIVE, reason)
    lo, hi = grid.labels[0], grid.labels[-1]
    cells = [((p, lo), (p, hi)) for p in grid.policies]
    return _gain_trend(grid, init, finding, cells, (f"{lo} labels per class", f"{hi} labels per class"),
                       "(policy, seed)")


def verdict_augmentation(grid: Grid, init: str) -> Verdict:
    """(b) The gain of `init` over random shrinks from the weakest to the strongest policy."""
    finding = f"{FINDING_B} ({init})"
    reason = _missing_gain_axes(grid, init)
    if reason is None and len(grid.policies) < 2:
        reason = f"only one policy ({grid.policies[0]})"
    if reason:
        return Verdict(finding, INCONCLUSIVE, reason)
    weak, strong = grid.policies[0], grid.policies[-1]
    cells = [((weak, n), (strong, n)) for n in grid.labels]
    return _gain_trend(grid, init, finding, cells, (f"policy {weak}", f"policy {strong}"), "(labels, seed)")


def verdict_hurts(grid: Grid, init: str) -> Verdict:
    """(c) At the strongest policy (S3/S4) the gain of `init` over random is negative for some label count."""
    finding = f"{FINDING_C} ({init})"
    reason = _missing_gain_axes(grid, init)
    strongest = grid.policies[-1] if grid.policies else ""
    if reason is None and strongest.lower() not in STRONG_POLICIES:
        reason = f"the strongest policy in the grid is {strongest}; the finding is about S3/S4"
    if reason:
        return Verdict(finding, INCONCLUSIVE, reason)
    parts, signs = [], []
    for labels in grid.labels:
        gains = grid.paired((init, "off"), (BASELINE, "off"), strongest, labels)
        if gains:
            stat = describe(list(gains.values()))
            signs.append(significance(stat))
            parts.append(f"{labels} labels per class: {_evidence_number(stat)}")
    if not signs:
        return Verdict(finding, INCONCLUSIVE, f"no seed has both {init} and random at policy {strongest}")
    outcome = REPRODUCED if -1 in signs else NOT_REPRODUCED if all(s == 1 for s in signs) else INCONCLUSIVE
    evidence = f"gain of {init} over random (self-training off) at policy {strongest}: " + "; ".join(parts)
    return Verdict(finding, outcome, evidence)


def verdict_ssl_like_supervised(grid: Grid, ssl_init: str) -> Verdict:
    """(d) The SSL init's verdicts for a, b, c agree with the supervised init's."""
    finding = f"{FINDING_D} ({ssl_init})"
    if SUPERVISED not in grid.inits or ssl_init not in grid.inits:
        return Verdict(finding, INCONCLUSIVE, f"needs both a supervised and a {ssl_init} init in the grid")
    parts, pairs = [], []
    for name, verdict in (("a", verdict_labels), ("b", verdict_augmentation), ("c", verdict_hurts)):
        sup, ssl = verdict(grid, SUPERVISED).outcome, verdict(grid, ssl_init).outcome
        pairs.append((sup, ssl))
        parts.append(f"{name}: supervised {sup}, {ssl_init} {ssl}")
    if any({sup, ssl} == {REPRODUCED, NOT_REPRODUCED} for sup, ssl in pairs):
        outcome = NOT_REPRODUCED
    elif all(sup == ssl for sup, ssl in pairs) and not all(sup == INCONCLUSIVE for sup, _ in pairs):
        outcome = REPRODUCED
    else:
        outcome = INCONCLUSIVE
    return Verdict(finding, outcome, "; ".join(parts))


def _pooled(grid: Grid, arm: Arm, base: Arm) -> list[float]:
    """Paired per (policy, labels, seed) differences arm − base over the whole grid."""
    return [d for p in grid.policies for n in grid.labels for d in grid.paired(arm, base, p, n).values()]


def verdict_self_training_helps(grid: Grid) -> Verdict:
    """(e) Self-training on − off is significantly positive in every (init, policy, labels) cell."""
    cells: list[tuple[str, Stat]] = []
    for init in grid.inits:
        for policy in grid.policies:
            for labels in grid.labels:
                diffs = grid.paired((init, "on"), (init, "off"), policy, labels)
                if diffs:
                    cells.append((f"{init}/{policy}/{labels}", describe(list(diffs.values()))))
    if not cells:
        return Verdict(FINDING_E, INCONCLUSIVE, "no cell has arms both with and without self-training")
    signs = [significance(stat) for _, stat in cells]
    negative = [name for (name, _), s in zip(cells, signs) if s == -1]
    pooled = describe([d for i in grid.inits for d in _pooled(grid, (i, "on"), (i, "off"))])
    evidence = (f"self-training on − off, paired per seed in each (init, policy, labels) cell: {signs.count(1)} of "
                f"{len(cells)} cells significantly > 0, {len(negative)} significantly < 0; all cells pooled: "
                f"{format_gain(pooled)}, n={pooled.n}")
    if negative:
        evidence += "; negative in " + ", ".join(negative)
    outcome = NOT_REPRODUCED if negative else REPRODUCED if all(s == 1 for s in signs) else INCONCLUSIVE
    return Verdict(FINDING_E, outcome, evidence)


def verdict_stacks(grid: Grid, init: str) -> Verdict:
    """(f) (init + self-training) − (init alone), pooled over cells, is significantly positive."""
    finding = f"{FINDING_F} ({init})"
    with_st, alone = (init, "on"), (init, "off")
    diffs = _pooled(grid, with_st, alone)
    if not diffs:
        return Verdict(finding, INCONCLUSIVE, f"no seed has {init} both with and without self-training")
    stat = describe(diffs)
    evidence = f"{pair_label(with_st, alone)}, paired per (policy, labels, seed): {_evidence_number(stat)}"
    versus_random = _pooled(grid, with_st, (BASELINE, "on"))
    if versus_random:
        evidence += (f"; {pair_label(with_st, (BASELINE, 'on'))}: "
                     f"{_evidence_number(describe(versus_random))}")
    return Verdict(finding, _outcome(significance(stat)), evidence)


def all_verdicts(grid: Grid) -> list[Verdict]:
    """Every finding's verdict: a, b, c and f once per pretrained init, d once per SSL init."""
    verdicts: list[Verdict] = []
    per_init = ((FINDING_A, verdict_labels), (FINDING_B, verdict_augmentation), (FINDING_C, verdict_hurts))
    for finding, verdict in per_init:
        verdicts += [verdict(grid, i) for i in grid.pretrained] or [
            Verdict(finding, INCONCLUSIVE, "no pretrained init in the grid")]
    ssl_inits = [i for i in grid.pretrained if is_ssl(i)]
    verdicts += [verdict_ssl_like_supervised(grid, i) for i in ssl_inits] or [
        Verdict(FINDING_D, INCONCLUSIVE, "no self-supervised init (simclr / *ssl*) in the grid")]
    verdicts.append(verdict_self_training_helps(grid))
    verdicts += [verdict_stacks(grid, i) for i in grid.pretrained] or [
        Verdict(FINDING_F, INCONCLUSIVE, "no pretrained init in the grid")]
    return verdicts


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


# ----------------------------------------------------------------------------------------------- plots

def _colors(grid: Grid) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {init: cycle[i % len(cycle)] for i, init in enumerate(grid.inits)}


def accuracy_chart(grid: Grid, path: Path) -> None:
    """One panel per label count: top-1 % against policy, a line per arm (dashed: with self-training)."""
    colors = _colors(grid)
    fig, axes = plt.subplots(1, max(1, len(grid.labels)), figsize=(4.2 * max(1, len(grid.labels)), 3.4),
                             squeeze=False, sharey=True)
    arms = grid.arms()
    for ax, labels in zip(axes[0], grid.labels):
        for k, arm in enumerate(arms):
            cells = [(x, describe(list(v.values()))) for x, p in enumerate(grid.policies)
                     if (v := grid.values(arm, p, labels))]
            if not cells:
                continue
            shift = 0.02 * (k - (len(arms) - 1) / 2)  # keeps error bars of neighbouring arms apart
            ax.errorbar([x + shift for x, _ in cells], [s.mean for _, s in cells],
                        yerr=[s.std or 0.0 for _, s in cells], color=colors[arm[0]],
                        linestyle="--" if arm[1] == "on" else "-", marker="o", capsize=3, label=arm_label(arm))
        ax.set_xticks(range(len(grid.policies)), grid.policies)
        ax.set_xlim(-0.4, len(grid.policies) - 0.6)
        ax.set_xlabel("augmentation policy")
        ax.set_title(f"{labels} labels per class")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 %")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def gain_chart(grid: Grid, path: Path) -> None:
    """One panel per policy: gain in points against labels per class (pretrained over random; ST over none)."""
    colors = _colors(grid)
    pairs = [(a, b) for a, b in gain_pairs(grid) if a[1] == b[1] == "off" or (a[0] == b[0])]
    panels = max(1, len(grid.policies))
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False, sharey=True)
    for ax, policy in zip(axes[0], grid.policies):
        for arm, base in pairs:
            cells = [(n, describe(list(d.values()))) for n in grid.labels
                     if (d := grid.paired(arm, base, policy, n))]
            if cells:
                ax.errorbar([n for n, _ in cells], [s.mean for _, s in cells], yerr=[s.std or 0.0 for _, s in cells],
                            color=colors[arm[0]], linestyle="--" if arm[0] == base[0] else "-", marker="o",
                            capsize=3, label=pair_label(arm, base))
        if not pairs:
            ax.text(0.5, 0.5, "no paired gains in this grid", ha="center", va="center", transform=ax.transAxes)
        if grid.labels and grid.labels[0] > 0 and grid.labels[-1] >= 10 * grid.labels[0]:
            ax.set_xscale("log")
            ax.minorticks_off()
        if pairs:
            ax.set_xticks(grid.labels, [str(n) for n in grid.labels])
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("labels per class")
        ax.set_title(f"policy {policy}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gain (points)")
    if pairs:
        axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- Markdown

def _markdown_tables(grid: Grid, table: dict[int, dict[str, dict[str, Stat]]],
                     fmt: Callable[[Stat], str], first: str) -> list[str]:
    lines = []
    for labels, rows in table.items():
        lines += [f"### {labels} labels per class", "", f"| {first} | " + " | ".join(grid.policies) + " |",
                  "|" + "---|" * (len(grid.policies) + 1)]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(fmt(row[p]) if p in row else "—" for p in grid.policies) + " |")
        lines.append("")
    return lines


def _wall_lines(results: Sequence[ArmResult]) -> list[str]:
    ordered = sorted(results, key=lambda r: (init_key(r.init), mode_key(r.self_training), policy_key(r.policy),
                                             r.labels_per_class, r.seed))
    lines = ["| init | self-training | policy | labels per class | seed | steps | top-1 % | wall s |",
             "|" + "---|" * 8]
    lines += [f"| {r.init} | {r.self_training} | {r.policy} | {r.labels_per_class} | {r.seed} | {r.steps} "
              f"| {100 * r.top1:.2f} | {r.wall_seconds:.0f} |" for r in ordered]
    total = sum(r.wall_seconds for r in results)
    steps = sorted({r.steps for r in results})
    same = f"{steps[0]} optimizer steps in every arm" if len(steps) == 1 else (
        f"optimizer steps differ across arms ({steps[0]} to {steps[-1]}): the budget was not equal")
    return lines + ["", f"Total: {total:.0f} s ({total / 3600:.2f} h) over {len(results)} arms; {same}."]


def _provenance_lines(value: dict, depth: int = 0) -> list[str]:
    pad = "  " * depth
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines += [f"{pad}- {key}:"] + (_provenance_lines(item, depth + 1) or [f"{pad}  - (none)"])
        elif isinstance(item, (list, tuple)):
            lines.append(f"{pad}- {key}: {', '.join(str(v) for v in item)}")
        else:
            lines.append(f"{pad}- {key}: {item}")
    return lines


def _axes_line(grid: Grid, results: Sequence[ArmResult]) -> str:
    return (f"{len(results)} arms. Inits: {', '.join(grid.inits)}; self-training: {', '.join(grid.modes)}; "
            f"policies: {', '.join(grid.policies)}; labels per class: {', '.join(map(str, grid.labels))}; "
            f"seeds: {', '.join(map(str, grid.seeds))}.")


def report_markdown(grid: Grid, results: Sequence[ArmResult], verdicts: list[Verdict], provenance: dict,
                    config_yaml: str, budget: str) -> str:
    lines = ["# Pre-training vs self-training (Zoph et al. 2020, small scale)", "", _axes_line(grid, results), "",
             "## Test top-1 %", "", "Mean ± sample std over seeds; a single seed shows the value alone.", ""]
    lines += _markdown_tables(grid, top1_table(grid), format_top1, "arm")
    lines += ["## Gains (points)", "",
              "Paired per seed (same policy, labels and seed): mean ± sample std of the differences (SE).", ""]
    lines += _markdown_tables(grid, gains_table(grid), format_gain, "comparison")
    lines += ["## Findings", "",
              "Significant: |mean| > 2 SE of the paired differences; n=1 or an undefined SE is inconclusive.", ""]
    lines += [f"- **{v.finding}**: {v.outcome}. {v.evidence}" for v in verdicts]
    lines += ["", "## Plots", "", f"![top-1 against policy]({ACCURACY_PNG})", "",
              f"![gain against labels per class]({GAIN_PNG})", "", "## Wall time per arm", ""]
    lines += _wall_lines(results)
    lines += ["", "## Budget", "", budget.strip(), "", "## Provenance", ""]
    lines += _provenance_lines(provenance) or ["- (none recorded)"]
    lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def _stats_json(table: dict[int, dict[str, dict[str, Stat]]]) -> dict:
    return {str(n): {row: {p: s.as_dict() for p, s in cells.items()} for row, cells in rows.items()}
            for n, rows in table.items()}


def write_compare_report(out: Path, results: list[ArmResult], provenance: dict, config_yaml: str,
                         budget: str) -> dict:
    """Write summary.csv, report.md and the two PNGs into `out`; return the verdicts and tables (for metrics.json)."""
    if not results:
        raise ValueError("no arm results to report: the compare grid produced nothing")
    out = Path(out)
    grid = Grid(results)
    verdicts = all_verdicts(grid)
    write_text(out / "summary.csv", results_csv(results))
    accuracy_chart(grid, out / ACCURACY_PNG)
    gain_chart(grid, out / GAIN_PNG)
    write_text(out / "report.md", report_markdown(grid, results, verdicts, provenance, config_yaml, budget))
    return {"arms": len(results),
            "verdicts": [dataclasses.asdict(v) for v in verdicts],
            "top1": _stats_json(top1_table(grid)),
            "gains": _stats_json(gains_table(grid)),
            "wall_seconds_total": sum(r.wall_seconds for r in results)}
