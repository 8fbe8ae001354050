"""`selftrain summarize`: mean +- std over runs, gain over each run's own teacher, wall time per stage."""

import json
from pathlib import Path

from pipeline.cli import main
from pipeline.core.rundir import RunDir


def fake_run(root: Path, teacher: float, student: float, seconds: float) -> Path:
    run = RunDir(root)
    root.mkdir(parents=True)
    run.config_path.write_text("seed: 0\n")  # the stage graph comes from the run's config
    for stage, top1 in (("teacher", teacher), ("student_r1", student)):
        run.stage_dir(stage).mkdir()
        run.metrics_path(stage).write_text(json.dumps({"top1": top1, "holdout": {"top1": top1 - 0.01}}))
        # what the stage clock leaves after two invocations (a resumed stage): their seconds add up
        (run.stage_dir(stage) / "wall_time.json").write_text(json.dumps({"seconds": 2 * seconds, "invocations": 2}))
        run.mark_done(stage)
    return root


def test_summary_reports_mean_std_gain_and_wall(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0.80, 0.84, 10)
    b = fake_run(tmp_path / "b", 0.82, 0.84, 20)
    assert main(["summarize", str(a), str(b), "--out", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:]] for line in out.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["teacher"][1] == "81.00 ± 1.41"          # test top-1, sample std
    assert rows["student_r1"][2] == "3.00 ± 1.41"        # gains 4 and 2 points over each run's own teacher
    assert rows["student_r1"][3] == "83.00 ± 0.00"       # holdout top-1
    assert rows["student_r1"][5] == "30"                 # mean of 2x10 s and 2x20 s
    mark, table = (tmp_path / "t.md").read_text().split("\n", 1)
    assert mark == "<!-- written by selftrain summarize -->" and table.strip() == out.strip()


def test_summary_names_a_run_without_teacher(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["summarize", str(tmp_path / "empty")]) == 2
    assert "empty is not a run directory (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "empty" / "config.yaml").write_text("seed: 0\n")
    assert main(["summarize", str(tmp_path / "empty")]) == 2
    assert "no finished teacher stage" in capsys.readouterr().err


def test_summary_names_a_missing_directory(tmp_path, capsys):
    assert main(["summarize", str(tmp_path / "nope")]) == 2
    assert "run directory " + str(tmp_path / "nope") + " does not exist" in capsys.readouterr().err


def test_summary_notes_runs_that_differ_in_more_than_their_seeds(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0.80, 0.84, 10)
    b = fake_run(tmp_path / "b", 0.82, 0.84, 20)
    RunDir(b).config_path.write_text("seed: 1\ndata:\n  seed: 1\nruntime:\n  threads: 1\n")  # seeds, threads: a mean
    assert main(["summarize", str(a), str(b)]) == 0
    assert "differ" not in capsys.readouterr().out
    RunDir(b).config_path.write_text("seed: 1\nteacher:\n  train:\n    epochs: 200\n")
    assert main(["summarize", str(a), str(b)]) == 0
    assert "**Note: these runs differ in more than their seeds**: teacher.train.epochs (80 / 200)" in \
        capsys.readouterr().out


def test_summary_notes_runs_made_with_the_same_seeds(tmp_path, capsys):
    """A copy of a run (or the same seeds rerun) is no second seed: its spread would read as seed spread."""
    a = fake_run(tmp_path / "a", 0.80, 0.84, 10)
    b = fake_run(tmp_path / "b", 0.80, 0.84, 10)
    c = fake_run(tmp_path / "c", 0.82, 0.85, 10)
    RunDir(c).config_path.write_text("seed: 1\ndata:\n  seed: 1\nselect:\n  seed: 1\n")
    assert main(["summarize", str(a), str(b), str(c)]) == 0
    out = capsys.readouterr().out
    assert f"**Note: runs with the same seeds** (seed, data.seed, select.seed): {a} = {b}." in out
    assert str(c) + " =" not in out and "= " + str(c) not in out


def test_summary_gives_the_distilled_gain_over_its_teacher_and_the_selected_labels_accuracy(tmp_path, capsys):
    root = fake_run(tmp_path / "a", 0.80, 0.84, 10)
    run = RunDir(root)
    run.config_path.write_text("seed: 0\ndistill:\n  students: [{arch: mobilenetv3_small_100, input_size: 64}]\n")
    written = {"pseudo_label_r1": {"pool_accuracy": 0.8351},
               "select_r1": {"selected_accuracy": {"weighted_by_copies": 0.8456}},
               "distill_mobilenetv3_small_100": {"top1": 0.8650, "teacher_top1": 0.8400}}
    for stage, metrics in written.items():
        run.stage_dir(stage).mkdir()
        run.metrics_path(stage).write_text(json.dumps(metrics))
        run.mark_done(stage)
    assert main(["summarize", str(root)]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["pseudo_label_r1"][4] == "83.51" and rows["select_r1"][4] == "84.56"
    assert rows["distill_mobilenetv3_small_100"][2] == "2.50"  # over the teacher it was taught by, not the run's


def test_one_run_given_twice_is_refused(tmp_path, capsys, monkeypatch):
    """`summarize run run` counted it as two seeds with one result (n=2, ± 0.00)."""
    run = fake_run(tmp_path / "a", 0.80, 0.84, 10)
    monkeypatch.chdir(tmp_path)
    assert main(["summarize", str(run), "a"]) == 2
    assert f"{run} and a are one run directory, given twice" in capsys.readouterr().err


def test_the_per_seed_imports_of_a_compare_arm_are_no_difference():
    """`summarize OUT/arms/x-s0 OUT/arms/x-s1` said the runs differ in data.path: each seed has its own import."""
    from pathlib import Path

    from pipeline.experiments.summary import config_differences

    def flat(path: str, seed: int) -> dict:
        return {"seed": seed, "data.path": path}

    assert config_differences({Path("a"): flat("/o/data/l4-s0/data", 0), Path("b"): flat("/o/data/l4-s1/data", 1)}) == []
    assert config_differences({Path("a"): flat("/o/data/l4-s0/data", 0), Path("b"): flat("/o/data/l8-s1/data", 1)})


def test_settings_an_import_used_in_place_does_not_read_are_no_difference():
    """Runs on `data.source: shards` were said to differ in data.labels_per_class, which that source ignores."""
    from pathlib import Path

    from pipeline.experiments.summary import config_differences

    def flat(source: str, labels: int, cap: int | None = None) -> dict:
        return {"data.source": source, "data.path": "/imp", "data.labels_per_class": labels, "data.max_unlabeled": cap}

    assert config_differences({Path("a"): flat("shards", 100), Path("b"): flat("shards", 50)}) == []
    assert config_differences({Path("a"): flat("shards", 100), Path("b"): flat("shards", 100, 10)}) == [
        "data.max_unlabeled (None / 10)"]  # a cap that source does check
    assert config_differences({Path("a"): flat("fashion-mnist", 100), Path("b"): flat("fashion-mnist", 50)}) == [
        "data.labels_per_class (100 / 50)"]
