"""Verdicts on the findings of Zoph et al. 2020 ("Rethinking Pre-training and Self-training") from a compare grid.

Each finding is "reproduced", "not reproduced" or "inconclusive" (the paired difference not significant in a
t-test at 5 %, or an axis the finding needs is missing from the grid), with the numbers it rests on. Where a
finding pools several cells, each seed's differences are averaged over the cells first: the cells of one seed
share its imports (the labeled draw), so they are not independent observations, and n is the number of seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipeline.experiments.compare_stats import (BASELINE, INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, STRONG_POLICIES,
                                                SUPERVISED, Arm, Grid, Stat, describe, evidence_number,
                                                format_gain, holm_significance, is_ssl, pair_label, policy_kind,
                                                significance)


@dataclass(frozen=True)
class Verdict:
    finding: str
    outcome: str  # REPRODUCED, NOT_REPRODUCED or INCONCLUSIVE
    evidence: str


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


def _per_seed_mean(per_cell: list[dict[int, float]]) -> tuple[dict[int, float], str]:
    """{seed: mean over the cells} of per-cell {seed: value} maps, for the seeds every cell has (a seed
    averaged over other cells than the rest, in a grid grown with `--only`, would measure another thing), and
    '; seeds 3, 4 left out: not in every cell' for the evidence ('' when every seed is used)."""
    if not per_cell:
        return {}, ""
    seeds = sorted(set.intersection(*(set(cell) for cell in per_cell)))
    left = sorted({seed for cell in per_cell for seed in cell} - set(seeds))
    note = (f"; seed{'s' if len(left) > 1 else ''} {', '.join(map(str, left))} left out: not in every cell"
            if left else "")
    return {seed: sum(cell[seed] for cell in per_cell) / len(per_cell) for seed in seeds}, note


def _gain_trend(grid: Grid, init: str, finding: str, cells: list[tuple[tuple[str, int], tuple[str, int]]],
                ends: tuple[str, str], averaged_over: str) -> Verdict:
    """Gain over random at the `lo` cell minus at the `hi` cell, paired per seed, each seed's differences
    averaged over the cell pairs; both ends printed over exactly the seeds and cells the difference uses."""
    arm, base = (init, "off"), (BASELINE, "off")
    lo_cells, hi_cells = [], []
    for lo, hi in cells:
        g_lo, g_hi = grid.paired(arm, base, *lo), grid.paired(arm, base, *hi)
        both = [seed for seed in g_lo if seed in g_hi]
        if both:  # a pair of cells the grid has not run (yet) is not averaged over
            lo_cells.append({seed: g_lo[seed] for seed in both})
            hi_cells.append({seed: g_hi[seed] for seed in both})
    (lo_gain, left_out), (hi_gain, _) = _per_seed_mean(lo_cells), _per_seed_mean(hi_cells)  # same seeds
    if not lo_gain:
        return Verdict(finding, INCONCLUSIVE, f"no seed has {init} and random at both {ends[0]} and {ends[1]}")
    stat = describe([lo_gain[seed] - hi_gain[seed] for seed in lo_gain])
    if len(lo_cells) < len(cells):
        averaged_over += f" ({len(lo_cells)} of {len(cells)} have both ends run)"
    evidence = (f"gain of {init} over random (self-training off), each seed averaged over {averaged_over}, at "
                f"{ends[0]}: {format_gain(describe(list(lo_gain.values())))}; at {ends[1]}: "
                f"{format_gain(describe(list(hi_gain.values())))}; difference, paired per seed: {evidence_number(stat)}"
                f"{left_out}")
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
                       "policies")


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
    return _gain_trend(grid, init, finding, cells, (f"policy {weak}", f"policy {strong}"), "label counts")


def verdict_hurts(grid: Grid, init: str) -> Verdict:
    """(c) At the strongest policy (S3/S4) the gain of `init` over random is negative for some label count."""
    finding = f"{FINDING_C} ({init})"
    reason = _missing_gain_axes(grid, init)
    strongest = grid.policies[-1] if grid.policies else ""
    if reason is None and policy_kind(strongest) not in STRONG_POLICIES:
        reason = f"the strongest policy in the grid is {strongest}; the finding is about S3/S4"
    if reason:
        return Verdict(finding, INCONCLUSIVE, reason)
    cells: list[tuple[int, Stat]] = []
    for labels in grid.labels:
        gains = grid.paired((init, "off"), (BASELINE, "off"), strongest, labels)
        if gains:
            cells.append((labels, describe(list(gains.values()))))
    if not cells:
        return Verdict(finding, INCONCLUSIVE, f"no seed has both {init} and random at policy {strongest}")
    signs = holm_significance([stat for _, stat in cells])  # "hurts at some label count": one family
    outcome = REPRODUCED if -1 in signs else NOT_REPRODUCED if all(s == 1 for s in signs) else INCONCLUSIVE
    evidence = (f"gain of {init} over random (self-training off) at policy {strongest}, Holm-corrected over "
                f"{len(cells)} label count(s): "
                + "; ".join(f"{labels} labels per class: {evidence_number(stat, sign)}"
                            for (labels, stat), sign in zip(cells, signs)))
    return Verdict(finding, outcome, evidence)


def verdict_ssl_like_supervised(grid: Grid, ssl_init: str, supervised: str = SUPERVISED) -> Verdict:
    """(d) The SSL init's verdicts for a, b, c agree with the supervised init's."""
    finding = f"{FINDING_D} ({ssl_init})"
    if supervised not in grid.inits or ssl_init not in grid.inits:
        return Verdict(finding, INCONCLUSIVE, f"needs both a supervised and a {ssl_init} init in the grid")
    parts, pairs = [], []
    for name, verdict in (("a", verdict_labels), ("b", verdict_augmentation), ("c", verdict_hurts)):
        sup, ssl = verdict(grid, supervised).outcome, verdict(grid, ssl_init).outcome
        pairs.append((sup, ssl))
        parts.append(f"{name}: {supervised} {sup}, {ssl_init} {ssl}")
    if any({sup, ssl} == {REPRODUCED, NOT_REPRODUCED} for sup, ssl in pairs):
        outcome = NOT_REPRODUCED
    elif all(sup == ssl for sup, ssl in pairs) and not all(sup == INCONCLUSIVE for sup, _ in pairs):
        outcome = REPRODUCED
    else:
        outcome = INCONCLUSIVE
    return Verdict(finding, outcome, "; ".join(parts))


def _pooled(grid: Grid, arm: Arm, base: Arm) -> tuple[list[float], str]:
    """arm − base paired per seed, each seed's differences averaged over every (policy, labels) cell that has
    both; and `_per_seed_mean`'s note on the seeds left out."""
    per_cell = [cell for p in grid.policies for n in grid.labels if (cell := grid.paired(arm, base, p, n))]
    means, left_out = _per_seed_mean(per_cell)
    return list(means.values()), left_out


def verdict_self_training_helps(grid: Grid) -> Verdict:
    """(e) Self-training on − off is significantly positive in every (init, policy, labels) cell (the
    cells tested as one family, Holm-corrected)."""
    cells: list[tuple[str, Stat]] = []
    per_cell: list[dict[int, float]] = []
    for init in grid.inits:
        for policy in grid.policies:
            for labels in grid.labels:
                diffs = grid.paired((init, "on"), (init, "off"), policy, labels)
                if diffs:
                    cells.append((f"{init}/{policy}/{labels}", describe(list(diffs.values()))))
                    per_cell.append(diffs)
    if not cells:
        return Verdict(FINDING_E, INCONCLUSIVE, "no cell has arms both with and without self-training")
    signs = holm_significance([stat for _, stat in cells])
    negative = [name for (name, _), s in zip(cells, signs) if s == -1]
    means, left_out = _per_seed_mean(per_cell)
    pooled = evidence_number(describe(list(means.values()))) if means else "no seed is in every cell"
    evidence = (f"self-training on − off, paired per seed in each (init, policy, labels) cell (Holm-corrected over "
                f"the cells): {signs.count(1)} of {len(cells)} cells significantly > 0, {len(negative)} significantly "
                f"< 0; each seed averaged over all cells: {pooled}{left_out}")
    if negative:
        evidence += "; negative in " + ", ".join(negative)
    outcome = NOT_REPRODUCED if negative else REPRODUCED if all(s == 1 for s in signs) else INCONCLUSIVE
    return Verdict(FINDING_E, outcome, evidence)


def verdict_stacks(grid: Grid, init: str) -> Verdict:
    """(f) (init + self-training) − (init alone), pooled over cells, is significantly positive."""
    finding = f"{FINDING_F} ({init})"
    with_st, alone = (init, "on"), (init, "off")
    diffs, left_out = _pooled(grid, with_st, alone)
    if not diffs:
        return Verdict(finding, INCONCLUSIVE, f"no seed has {init} both with and without self-training in every "
                                              "cell that has either")
    stat = describe(diffs)
    evidence = (f"{pair_label(with_st, alone)}, paired per seed, averaged over the (policy, labels) cells: "
                f"{evidence_number(stat)}{left_out}")
    versus_random, left_out = _pooled(grid, with_st, (BASELINE, "on"))
    if versus_random:
        evidence += (f"; {pair_label(with_st, (BASELINE, 'on'))}: "
                     f"{evidence_number(describe(versus_random))}{left_out}")
    return Verdict(finding, _outcome(significance(stat)), evidence)


def all_verdicts(grid: Grid, source_kinds: Mapping[str, str] | None = None) -> list[Verdict]:
    """Every finding's verdict: a, b, c and f once per pretrained init, d once per self-supervised init.
    `source_kinds`: {init: kind} from the compare config's sources (None, a summary.csv alone: told by name)."""
    verdicts: list[Verdict] = []
    per_init = ((FINDING_A, verdict_labels), (FINDING_B, verdict_augmentation), (FINDING_C, verdict_hurts))
    for finding, verdict in per_init:
        verdicts += [verdict(grid, i) for i in grid.pretrained] or [
            Verdict(finding, INCONCLUSIVE, "no pretrained init in the grid")]
    ssl_inits = [i for i in grid.pretrained if is_ssl(i, source_kinds)]
    supervised = next((i for i in grid.pretrained if (source_kinds or {}).get(i) == "supervised"), SUPERVISED)
    verdicts += [verdict_ssl_like_supervised(grid, i, supervised) for i in ssl_inits] or [
        Verdict(FINDING_D, INCONCLUSIVE, "no self-supervised init (a simclr source) in the grid")]
    verdicts.append(verdict_self_training_helps(grid))
    verdicts += [verdict_stacks(grid, i) for i in grid.pretrained] or [
        Verdict(FINDING_F, INCONCLUSIVE, "no pretrained init in the grid")]
    return verdicts
