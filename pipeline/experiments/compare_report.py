"""The report of a `selftrain compare` grid (Zoph et al. 2020, "Rethinking Pre-training and Self-training").

Axes: init ("random" is the baseline), self-training ("off"/"on"), augmentation policy (s1 < s2 < s3 < s4),
labels per class, seed. Writes into one directory:

- summary.csv: one row per arm (read back with `load_results_csv`);
- report.md: top-1 tables in the paper's shape, paired gains, verdicts on the paper's findings, plots,
  wall time per arm, the budget, provenance and the resolved config;
- accuracy_vs_policy.png and gain_vs_labels.png.

Statistics: see compare_stats (paired per seed; a two-sided t-test at 5 %, Holm-corrected over a family of
cells; pooled findings average each seed over the cells first).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt

from pipeline.core.atomic import write_text
from pipeline.core.plots import save_figure
from pipeline.experiments.compare_grid import MODE_NAMES
from pipeline.experiments.compare_stats import (ACCURACY_PNG, GAIN_PNG, ArmResult, Grid, Stat, arm_label, describe,
                                                format_gain, format_top1, gain_pairs, gains_table, init_key, mode_key,
                                                pair_label, policy_key, results_csv, top1_table)
from pipeline.experiments.compare_verdicts import Verdict, all_verdicts

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
    counts = {stat.n for rows in table.values() for row in rows.values() for stat in row.values()}
    cell = (lambda stat: f"{fmt(stat)} (n={stat.n})") if len(counts) > 1 else fmt  # a grid grown with --only
    for labels, rows in table.items():
        lines += [f"### {labels} labels per class", "", f"| {first} | " + " | ".join(grid.policies) + " |",
                  "|" + "---|" * (len(grid.policies) + 1)]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(cell(row[p]) if p in row else "—" for p in grid.policies) + " |")
        lines.append("")
    return lines


def _wall_lines(results: Sequence[ArmResult]) -> list[str]:
    ordered = sorted(results, key=lambda r: (init_key(r.init), mode_key(r.self_training), policy_key(r.policy),
                                             r.labels_per_class, r.seed))
    lines = ["| init | self-training | policy | labels per class | seed | steps | top-1 % | wall s |",
             "|" + "---|" * 8]
    lines += [f"| {r.init} | {r.self_training} | {r.policy} | {r.labels_per_class} | {r.seed} | {r.steps} "
              f"| {100 * r.top1:.2f} | {r.wall_seconds:.0f} |" for r in ordered]
    total = total_wall_seconds(results)
    steps = sorted({r.steps for r in results})
    same = f"{steps[0]} optimizer steps in every arm" if len(steps) == 1 else (
        f"optimizer steps differ across arms ({steps[0]} to {steps[-1]}): the budget was not equal")
    return lines + ["", f"Total: {total:.0f} s ({total / 3600:.2f} h) over {len(results)} arms, a teacher shared by "
                    f"an arm with self-training and its twin without counted once (each row counts it); {same}."]


def total_wall_seconds(results: Sequence[ArmResult]) -> float:
    """The arms' wall time with each training run counted once: an arm with self-training runs in its twin's
    run (same init, policy, labels, seed, self-training off), whose whole wall time is that shared teacher."""
    def twin(r: ArmResult) -> tuple:
        return r.init, r.policy, r.labels_per_class, r.seed

    alone = {twin(r): r.wall_seconds for r in results if r.self_training == MODE_NAMES[False]}
    shared = {twin(r) for r in results if r.self_training == MODE_NAMES[True]} & alone.keys()
    return sum(r.wall_seconds for r in results) - sum(alone[key] for key in shared)


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
              "Significant: a two-sided one-sample t-test of the paired per-seed differences gives p < 0.05 "
              "(n-1 degrees of freedom: with 2 seeds |t| must pass 12.7); a finding tested in several cells at once "
              "is Holm-corrected; a pooled finding averages each seed over its cells first, so n is the number of "
              "seeds (a seed missing from one of the cells is left out, and said so). n=1, or every seed giving the "
              "same difference (SE 0), is inconclusive.", ""]
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
                         budget: str, source_kinds: Mapping[str, str] | None = None) -> dict:
    """Write summary.csv, report.md and the two PNGs into `out`; return the verdicts and tables (for metrics.json).
    `source_kinds`: {init: kind} of the config's sources (which init is self-supervised)."""
    if not results:
        raise ValueError("no arm results to report: the compare grid produced nothing")
    out = Path(out)
    grid = Grid(results)
    verdicts = all_verdicts(grid, source_kinds)
    write_text(out / "summary.csv", results_csv(results))
    accuracy_chart(grid, out / ACCURACY_PNG)
    gain_chart(grid, out / GAIN_PNG)
    write_text(out / "report.md", report_markdown(grid, results, verdicts, provenance, config_yaml, budget))
    return {"arms": len(results),
            "verdicts": [dataclasses.asdict(v) for v in verdicts],
            "top1": _stats_json(top1_table(grid)),
            "gains": _stats_json(gains_table(grid)),
            "wall_seconds_total": total_wall_seconds(results)}
