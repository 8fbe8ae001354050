"""`selftrain compare` report: paper-shaped tables, paired gains, verdicts, plots, CSV round trip.

The fabricated grid has known effects (in points):
top-1 = base(labels) + 1 at s4 + gain(init, cell) + self-training gain
        + noise(arm) * scale(cell) * (-1, 0, +1)[seed]
so every mean ± std below can be worked out by hand. The designed effects are large enough for the
verdicts' t-tests with 3 seeds (2 degrees of freedom; Holm over a family of cells): e.g. supervised over
random at s4 and 10 labels is 4 ± 1.0 (SE 0.58, t = 6.9, p = 0.020), and self-training adds 6 points
with at most 0.6 of spread, which passes Holm's 0.05 / 12 in every cell.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.experiments.compare_report import write_compare_report
from pipeline.experiments.compare_stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, ArmResult, Grid, load_results_csv
from pipeline.experiments.compare_verdicts import (
    all_verdicts, verdict_augmentation, verdict_hurts, verdict_labels, verdict_self_training_helps,
    verdict_ssl_like_supervised, verdict_stacks)

Cell = tuple[str, int]
PATTERN = (-1.0, 0.0, 1.0)
NOISE = {("random", "off"): 0.2, ("random", "on"): 0.1, ("supervised", "off"): -0.3, ("supervised", "on"): -0.2,
         ("simclr", "off"): -0.1, ("simclr", "on"): 0.1}
SCALE = {("s1", 10): 1.0, ("s4", 10): 2.0, ("s1", 100): 3.0, ("s4", 100): 1.5}
BASE = {10: 60.0, 100: 80.0}
NO_GAIN = {cell: 0.0 for cell in SCALE}
SUPERVISED = {("s1", 10): 5.0, ("s4", 10): 4.0, ("s1", 100): 3.0, ("s4", 100): 2.0}
SIMCLR = {("s1", 10): 4.0, ("s4", 10): 2.5, ("s1", 100): 2.0, ("s4", 100): 1.5}
HURTS = {("s1", 10): 4.0, ("s4", 10): -1.0, ("s1", 100): 1.0, ("s4", 100): -3.0}


def make_results(gains: dict[str, dict[Cell, float]] | None = None, st_gain: float = 6.0,
                 noise_scale: float = 1.0) -> list[ArmResult]:
    gains = gains or {"random": NO_GAIN, "supervised": SUPERVISED, "simclr": SIMCLR}
    results = []
    for init, gain in gains.items():
        for mode in ("off", "on"):
            for (policy, labels), scale in SCALE.items():
                for seed, shape in enumerate(PATTERN):
                    points = (BASE[labels] + (1.0 if policy == "s4" else 0.0) + gain[(policy, labels)]
                              + (st_gain if mode == "on" else 0.0) + noise_scale * NOISE[(init, mode)] * scale * shape)
                    results.append(ArmResult(init, mode, policy, labels, seed, points / 100, 1000, 60.0 + seed))
    return results


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table(markdown: str, title: str, labels: int) -> dict[str, list[str]]:
    """{row name: cells} of the table under `### {labels} labels per class` in section `title`."""
    block = section(markdown, title).split(f"### {labels} labels per class\n", 1)[1].strip().split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines() if "---" not in line]
    return {row[0]: row[1:] for row in rows}


def outcomes(verdicts) -> dict[str, str]:
    return {v.finding: v.outcome for v in verdicts}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[ArmResult]]:
    out = tmp_path_factory.mktemp("compare")
    results = make_results()
    provenance = {"git": "abc123", "packages": {"torch": "2.3.0", "timm": "1.0"}, "device": "cpu"}
    metrics = write_compare_report(out, results, provenance, "seed: 0\ncompare:\n  seeds: 3\n",
                                   "Every arm trained for 1000 optimizer steps.")
    return out, metrics, results


def test_top1_tables_have_the_papers_shape(report):
    out, metrics, _ = report
    md = (out / "report.md").read_text()
    rows = table(md, "Test top-1 %", 10)
    assert rows["arm"] == ["s1", "s4"]
    assert list(rows)[1:] == ["random", "random + self-training", "supervised", "supervised + self-training",
                              "simclr", "simclr + self-training"]
    assert rows["random"] == ["60.00 ± 0.20", "61.00 ± 0.40"]  # 60 + 0.2*(-1,0,1); s4: 61 + 0.4*(-1,0,1)
    assert rows["supervised + self-training"][0] == "71.00 ± 0.20"  # 60 + 5 + 6, noise -0.2*(-1,0,1)
    assert table(md, "Test top-1 %", 100)["supervised"] == ["83.00 ± 0.90", "83.00 ± 0.45"]  # s4: 80 + 1 + 2
    assert metrics["top1"]["10"]["random"]["s1"]["n"] == 3


def test_gains_are_paired_per_seed(report):
    out, metrics, _ = report
    md = (out / "report.md").read_text()
    rows = table(md, "Gains (points)", 10)
    # supervised − random at s1/10: 5 + (-0.3 - 0.2)*(-1,0,1) -> std 0.5, SE 0.5/sqrt(3)
    assert rows["supervised − random"][0] == "+5.00 ± 0.50 (SE 0.29)"
    assert rows["(supervised + self-training) − (random + self-training)"][0] == "+5.00 ± 0.30 (SE 0.17)"
    # self-training on − off for random at s4/100: 6 + (0.1 - 0.2)*1.5*(-1,0,1)
    assert table(md, "Gains (points)", 100)["(random + self-training) − random"][1] == "+6.00 ± 0.15 (SE 0.09)"
    assert metrics["gains"]["10"]["supervised − random"]["s1"]["mean"] == pytest.approx(5.0)


def test_verdicts_on_the_designed_grid(report):
    _, metrics, results = report
    found = {v["finding"]: v["outcome"] for v in metrics["verdicts"]}
    assert found == {
        "a. pretraining helps less as labels grow (supervised)": REPRODUCED,
        "a. pretraining helps less as labels grow (simclr)": REPRODUCED,
        "b. pretraining helps less as augmentation gets stronger (supervised)": REPRODUCED,
        "b. pretraining helps less as augmentation gets stronger (simclr)": REPRODUCED,
        "c. pretraining can hurt with S3/S4 (supervised)": NOT_REPRODUCED,  # still helps at s4
        "c. pretraining can hurt with S3/S4 (simclr)": NOT_REPRODUCED,
        "d. self-supervised pretraining behaves like supervised (simclr)": REPRODUCED,
        "e. self-training helps in every cell": REPRODUCED,
        "f. self-training stacks on top of pretraining (supervised)": REPRODUCED,
        "f. self-training stacks on top of pretraining (simclr)": REPRODUCED,
    }
    grid = Grid(results)
    a = verdict_labels(grid, "supervised")
    # each seed averaged over the 2 policies: 4.5 - 2.5 = +2.00 per seed, n = 3 seeds (not 6 (policy, seed) pairs)
    assert "at 10 labels per class: +4.50" in a.evidence and "+2.00" in a.evidence and "n=3 (t = " in a.evidence
    assert "12 of 12 cells significantly > 0" in verdict_self_training_helps(grid).evidence
    assert "(supervised + self-training) − (random + self-training)" in verdict_stacks(grid, "supervised").evidence


def test_noise_larger_than_the_effect_is_inconclusive():
    grid = Grid(make_results(noise_scale=20.0))
    assert verdict_labels(grid, "supervised").outcome == INCONCLUSIVE
    e = verdict_self_training_helps(grid)
    assert e.outcome == INCONCLUSIVE
    assert "of 12 cells significantly > 0" in e.evidence


def test_reversed_effects_are_not_reproduced():
    reversed_gain = {("s1", 10): 4.0, ("s4", 10): 4.0, ("s1", 100): 8.0, ("s4", 100): 8.0}
    grid = Grid(make_results({"random": NO_GAIN, "supervised": reversed_gain, "simclr": HURTS}, st_gain=-2.0))
    assert verdict_labels(grid, "supervised").outcome == NOT_REPRODUCED  # gain grows with labels
    assert verdict_augmentation(grid, "supervised").outcome == INCONCLUSIVE  # no change with the policy
    assert verdict_hurts(grid, "simclr").outcome == REPRODUCED  # -1 and -3 points at s4
    assert verdict_hurts(grid, "supervised").outcome == NOT_REPRODUCED
    d = verdict_ssl_like_supervised(grid, "simclr")
    assert d.outcome == NOT_REPRODUCED and "c: supervised not reproduced, simclr reproduced" in d.evidence
    e = verdict_self_training_helps(grid)
    assert e.outcome == NOT_REPRODUCED and "negative in random/s1/10" in e.evidence
    assert verdict_stacks(grid, "supervised").outcome == NOT_REPRODUCED


def test_missing_axes_give_reasons_not_crashes():
    only_s1_10 = [r for r in make_results() if r.policy == "s1" and r.labels_per_class == 10]
    grid = Grid(only_s1_10)
    assert "only one label count" in verdict_labels(grid, "supervised").evidence
    assert "only one policy" in verdict_augmentation(grid, "supervised").evidence
    assert "strongest policy in the grid is s1" in verdict_hurts(grid, "supervised").evidence
    no_random = Grid([r for r in make_results() if r.init != "random"])
    assert "no random init" in verdict_labels(no_random, "simclr").evidence
    no_st = Grid([r for r in make_results() if r.self_training == "off"])
    assert verdict_self_training_helps(no_st).outcome == INCONCLUSIVE
    assert verdict_stacks(no_st, "supervised").outcome == INCONCLUSIVE
    no_ssl = Grid([r for r in make_results() if r.init != "simclr"])
    assert outcomes(all_verdicts(no_ssl))["d. self-supervised pretraining behaves like supervised"] == INCONCLUSIVE


def test_plots_exist_and_report_links_them(report):
    out, _, _ = report
    md = (out / "report.md").read_text()
    for name in ("accuracy_vs_policy.png", "gain_vs_labels.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size > 1000
        assert f"]({name})" in section(md, "Plots")
    assert not list(out.glob("*.tmp"))


def test_report_sections_and_metrics_json(report):
    out, metrics, results = report
    md = (out / "report.md").read_text()
    wall = section(md, "Wall time per arm")
    assert "| random | off | s1 | 10 | 0 | 1000 | 59.80 | 60 |" in wall
    assert "1000 optimizer steps in every arm" in wall
    assert "Every arm trained for 1000 optimizer steps." in section(md, "Budget")
    assert "- packages:\n  - torch: 2.3.0" in section(md, "Provenance")
    assert "```yaml\nseed: 0\ncompare:\n  seeds: 3\n```" in section(md, "Config")
    assert metrics["arms"] == len(results) == 72
    json.dumps(metrics)  # goes into metrics.json as it is


def test_summary_csv_round_trips(report):
    out, _, results = report
    assert load_results_csv(out / "summary.csv") == results


def test_summary_csv_missing_column_is_named(tmp_path):
    (tmp_path / "summary.csv").write_text("init,policy\nrandom,s1\n")
    with pytest.raises(ValueError, match="missing columns: self_training"):
        load_results_csv(tmp_path / "summary.csv")


def test_duplicate_arm_is_refused():
    result = make_results()[0]
    with pytest.raises(ValueError, match="two results for the same arm"):
        Grid([result, result])


def test_degenerate_grid_renders_with_inconclusive_verdicts(tmp_path):
    results = [ArmResult("random", "off", "s1", 10, 0, 0.5, 100, 3.0)]
    metrics = write_compare_report(tmp_path, results, {}, "", "One arm only.")
    assert {v["outcome"] for v in metrics["verdicts"]} == {INCONCLUSIVE}
    md = (tmp_path / "report.md").read_text()
    assert table(md, "Test top-1 %", 10)["random"] == ["50.00"]
    assert "- (none recorded)" in section(md, "Provenance")
    for name in ("accuracy_vs_policy.png", "gain_vs_labels.png", "summary.csv"):
        assert (tmp_path / name).stat().st_size > 0


def test_significance_is_a_t_test_not_two_standard_errors():
    """2 seeds, mean 1.0, SE 0.25: |mean| > 2 SE, but t = 4 with 1 degree of freedom is p = 0.156."""
    from pipeline.experiments.compare_stats import Stat, holm_significance, p_value, significance

    two_seeds = Stat(2, 1.0, 0.25 * 2 ** 0.5, 0.25)
    assert p_value(two_seeds) == pytest.approx(0.156, abs=0.001) and significance(two_seeds) == 0
    clear = Stat(2, -1.0, 0.05 * 2 ** 0.5, 0.05)  # t = -20: p = 0.032
    assert significance(clear) == -1
    assert holm_significance([clear]) == [-1]
    assert holm_significance([clear, Stat(2, 0.1, 1.0, 0.7)]) == [0, 0]  # 0.032 > 0.05 / 2 in a family of two
    assert holm_significance([Stat(1, 3.0, None, None), clear]) == [None, -1]  # an undefined SE is not counted


def test_policies_with_options_sort_by_their_base_policy():
    results = [r for r in make_results() if r.policy == "s1"]
    renamed = [dataclasses.replace(r, policy="s4-n2-m6-j0.8:1.25") for r in make_results() if r.policy == "s4"]
    weak = [dataclasses.replace(r, policy="s1-j0.5:2.0") for r in results]
    grid = Grid(weak + renamed)
    assert grid.policies == ["s1-j0.5:2.0", "s4-n2-m6-j0.8:1.25"]
    assert "strongest policy" not in verdict_hurts(grid, "supervised").evidence  # the s4 variant counts as S4
    assert verdict_hurts(grid, "supervised").outcome == NOT_REPRODUCED
    assert verdict_augmentation(grid, "supervised").outcome == REPRODUCED  # weak = the s1 variant


def test_which_init_is_self_supervised_comes_from_the_source_kinds():
    names = {"supervised": "imagenet", "simclr": "byol"}
    grid = Grid([dataclasses.replace(r, init=names.get(r.init, r.init)) for r in make_results()])
    by_kind = outcomes(all_verdicts(grid, {"imagenet": "supervised", "byol": "simclr"}))
    assert by_kind["d. self-supervised pretraining behaves like supervised (byol)"] == REPRODUCED
    by_name = outcomes(all_verdicts(grid))  # a summary.csv read alone: told by name, byol is not recognised
    assert by_name["d. self-supervised pretraining behaves like supervised"] == INCONCLUSIVE


def test_a_trend_prints_both_ends_over_the_seeds_its_difference_uses():
    """Seed 2 missing at 100 labels: the gain at 10 labels is printed over seeds 0-1 only, as the difference is."""
    results = [r for r in make_results() if not (r.labels_per_class == 100 and r.seed == 2)]
    evidence = verdict_labels(Grid(results), "supervised").evidence
    # seeds 0 and 1, averaged over policies: at 10 labels (5 + 4)/2 - 0.5*(1 + 2)/2*(-1, 0) = (5.25, 4.50),
    # mean 4.875 (printed 4.87: 4.875 is exact in binary and rounds to even), std 0.53
    assert "at 10 labels per class: +4.87 ± 0.53" in evidence and "n=2 (t = " in evidence


def test_total_wall_counts_a_shared_teacher_once():
    from pipeline.experiments.compare_report import total_wall_seconds
    alone = ArmResult("random", "off", "s1", 10, 0, 0.5, 100, 30.0)  # its whole run: the teacher
    with_rounds = ArmResult("random", "on", "s1", 10, 0, 0.6, 100, 130.0)  # that teacher + 100 s of rounds
    other_seed = ArmResult("random", "on", "s1", 10, 1, 0.6, 100, 125.0)  # its twin not in the results
    assert total_wall_seconds([alone, with_rounds, other_seed]) == 30.0 + 100.0 + 125.0


def test_policies_of_one_base_policy_sort_by_ops_magnitude_and_jitter():
    assert Grid([ArmResult("random", "off", p, 10, 0, 0.5, 100, 1.0) for p in
                 ("s4-m10", "s4-m2", "s4-m6", "s4-n3-m2", "s1-j0.5:2", "s1", "s2")]).policies == [
        "s1", "s1-j0.5:2", "s2", "s4-m2", "s4-m6", "s4-m10", "s4-n3-m2"]


def test_a_gain_falling_with_magnitude_is_read_from_the_weakest_to_the_strongest():
    """Gain +6 at m2, +4 at m6, -3 at m10: b and c are reproduced only if m10 is the strongest end."""
    results = []
    for policy, gain, spread in (("s4-m2", 6.0, 0.5), ("s4-m6", 4.0, 1.0), ("s4-m10", -3.0, 1.5)):
        for seed, noise in enumerate((-0.2, 0.0, 0.3)):
            results += [ArmResult("random", "off", policy, 10, seed, (70 + noise) / 100, 100, 1.0),
                        ArmResult("supervised", "off", policy, 10, seed, (70 + gain + spread * noise) / 100, 100, 1.0)]
    grid = Grid(results)
    assert verdict_augmentation(grid, "supervised").outcome == REPRODUCED
    assert verdict_hurts(grid, "supervised").outcome == REPRODUCED


def test_a_pooled_finding_uses_only_the_seeds_every_cell_has():
    """+2 at s1, -2 at s4; seeds 3-7 exist at s1 only (a grid grown with --only): averaging them over s1 alone
    beside seeds 0-2 averaged over both would find +1.26, p = 0.011."""
    noise = [0.1, -0.1, 0.05, -0.05, 0.0, 0.1, -0.1, 0.05]
    results = []
    for policy, effect, seeds in (("s1", 2.0, range(8)), ("s4", -2.0, range(3))):
        for seed in seeds:
            results += [ArmResult("supervised", "off", policy, 10, seed, 0.70, 100, 1.0),
                        ArmResult("supervised", "on", policy, 10, seed, (70 + effect + noise[seed]) / 100, 100, 1.0)]
    verdict = verdict_stacks(Grid(results), "supervised")
    assert verdict.outcome == INCONCLUSIVE
    assert "n=3 " in verdict.evidence and "seeds 3, 4, 5, 6, 7 left out: not in every cell" in verdict.evidence
    assert "left out" in verdict_self_training_helps(Grid(results)).evidence


def test_tables_show_n_when_cells_have_different_seed_counts(tmp_path):
    results = [r for r in make_results() if not (r.policy == "s4" and r.seed == 2)]
    write_compare_report(tmp_path, results, {}, "", "budget")
    md = (tmp_path / "report.md").read_text()
    s1, s4 = table(md, "Test top-1 %", 10)["random"]
    assert s1.endswith("(n=3)") and s4.endswith("(n=2)")
    write_compare_report(tmp_path, make_results(), {}, "", "budget")
    assert "(n=" not in table((tmp_path / "report.md").read_text(), "Test top-1 %", 10)["random"][0]


def test_every_seed_giving_the_same_difference_is_inconclusive():
    """SE 0 makes t infinite; with two seeds and coarse test sets that happens by chance (-20, -20)."""
    from pipeline.experiments.compare_stats import Stat, p_value, significance, significance_text

    same = Stat(2, -20.0, 0.0, 0.0)
    assert p_value(same) is None and significance(same) is None
    assert significance_text(same) == "every seed the same difference: SE 0, t undefined"
    assert p_value(Stat(3, 0.0, 0.0, 0.0)) is None


def test_a_trend_skips_a_pair_of_cells_the_grid_has_not_run():
    """s1 run at 10 labels only (a grid grown with --only): the s4 pair still measures finding a."""
    results = []
    for policy, labels in (("s1", 10), ("s4", 10), ("s4", 40)):
        for seed, noise in enumerate((-0.2, 0.0, 0.3)):
            gain, spread = (8.0, 1.0) if labels == 10 else (1.0, 2.0)
            results += [ArmResult("random", "off", policy, labels, seed, 0.70, 100, 1.0),
                        ArmResult("supervised", "off", policy, labels, seed, (70 + gain + spread * noise) / 100, 100, 1.0)]
    verdict = verdict_labels(Grid(results), "supervised")
    assert verdict.outcome == REPRODUCED and "averaged over policies (1 of 2 have both ends run)" in verdict.evidence
