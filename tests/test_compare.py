"""`selftrain compare`: grid expansion, shared artifacts, resume, equal budgets, the class filter,
pretraining sources as init, and a tiny grid end to end (one process, and torchrun with two)."""

import csv
import dataclasses
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config.schema import ConfigError, from_dict
from pipeline.core.rundir import RunDir, RunDirError
from pipeline.data.importer import ClassFilter, import_fashion_mnist
from pipeline.data.shards import iter_shard
from pipeline.data.sources.fashion_mnist import DataSourceError
from pipeline.engine.init import InitSource, apply_init
from pipeline.experiments.compare import BudgetError, arm_result, make_plan
from pipeline.experiments.compare_config import CompareConfig, check, load_compare_config
from pipeline.experiments.compare_grid import Arm, expand, select_arms
from teachers.checkpoint import CheckpointMeta, save_checkpoint
from teachers.models import create_model

GRID = {"axes": {"init": ["random", "supervised", "simclr"], "self_training": [False, True],
                 "policy": ["s1", "s4"], "labels_per_class": [10, 200], "seeds": [0, 1]},
        "sources": {"supervised": {"kind": "supervised", "data": {"classes": ["0", "1"]}},
                    "simclr": {"kind": "simclr"}},
        "budget": {"steps": 7, "batch_size": 16}}


def grid_config(**changes) -> CompareConfig:
    config = from_dict(CompareConfig, {**GRID, **changes})
    check(config)
    return config


def test_grid_expands_every_combination_with_readable_unique_names():
    arms = expand(grid_config())
    assert len(arms) == 3 * 2 * 2 * 2 * 2
    assert len({a.name for a in arms}) == len(arms)
    assert Arm("supervised", True, "s4", 10, 1).name == "supervised-on-s4-l10-s1"
    # self-training off and on of one cell read the same training run (one teacher)
    assert Arm("random", False, "s1", 10, 0).run_name == Arm("random", True, "s1", 10, 0).run_name


def test_plan_shares_imports_pretraining_and_teachers(tmp_path):
    plan = make_plan(grid_config(), tmp_path, None)
    kinds = [job.kind for job in plan.jobs]
    assert kinds.count("data") == 2 * 2  # one import per (labels, seed)
    assert kinds.count("pretrain") == 2  # one per trained source
    assert kinds.count("arms") == 3 * 2 * 2 * 2  # one teacher per (init, policy, labels, seed): off and on share it
    assert kinds == sorted(kinds, key=["data", "pretrain", "arms"].index)  # imports and pretraining first


def test_only_selects_arms_and_needs_only_their_jobs(tmp_path):
    config = grid_config()
    arms = select_arms(expand(config), "policy=s4,init=random")
    assert {(a.policy, a.init) for a in arms} == {("s4", "random")} and len(arms) == 2 * 2 * 2
    plan = make_plan(config, tmp_path, "init=random,seed=0")
    assert not [j for j in plan.jobs if j.kind == "pretrain"]
    assert {j.name for j in plan.jobs if j.kind == "data"} == {"l10-s0", "l200-s0"}
    with pytest.raises(ConfigError, match="unknown axis"):
        select_arms(expand(config), "polcy=s4")
    with pytest.raises(ConfigError, match="matches no arm"):
        select_arms(expand(config), "policy=s3")


def test_every_arm_gets_the_same_budget(tmp_path):
    plan = make_plan(grid_config(), tmp_path, None)
    for job in (j for j in plan.jobs if j.kind == "arms"):
        for train in (job.config.teacher.train, job.config.student.train):
            assert (train.steps, train.batch_size) == (7, 16)
        assert job.config.teacher.train.policy == job.config.student.train.policy
        assert job.config.teacher.model.init == job.config.student.model.init  # off and on start alike


def test_an_arm_that_trained_another_number_of_steps_is_refused(tmp_path):
    config = grid_config()
    arm = Arm("random", False, "s1", 10, 0)
    run = RunDir(tmp_path / "arms" / arm.run_name)
    run.write_metrics("teacher", {"top1": 0.5, "steps": 6, "wall_seconds": 1.0})
    with pytest.raises(BudgetError, match="trained 6 steps, the budget is 7"):
        arm_result(config, arm, tmp_path)
    run.write_metrics("teacher", {"top1": 0.5, "steps": 7, "wall_seconds": 1.0, "num_labeled": 10,
                                  "labeled_batch": 16})
    with pytest.raises(BudgetError, match=r"drew 16 labeled images a step, the budget is 10 \(16 capped at the 10"):
        arm_result(config, arm, tmp_path)


def test_compare_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"sources.s: missing required key\(s\) kind$"):
        grid_config(sources={"s": {}}, axes={**GRID["axes"], "init": ["s"]})
    with pytest.raises(ConfigError, match="axes.init: 'imagenet' is neither"):
        grid_config(axes={**GRID["axes"], "init": ["random", "imagenet"]})
    with pytest.raises(ConfigError, match="sources.sup: kind supervised needs data"):
        grid_config(sources={"sup": {"kind": "supervised"}}, axes={**GRID["axes"], "init": ["sup"]})
    path = tmp_path / "c.yaml"
    path.write_text("axes: {policy: [s1, s9]}\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_compare_config(path)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, arms, jobs", [("compare_fashion_mnist", 48, 30),
                                              ("compare_fashion_mnist_gpu", 216, 119)])
def test_the_shipped_compare_configs_load_and_plan_as_the_readme_says(name, arms, jobs, tmp_path, capsys, monkeypatch):
    """The README's `selftrain compare configs/...yaml [--only 'policy=s4'] --dry-run`: the grid and job
    counts its comments and the README name, the filter halving it; nothing is written."""
    monkeypatch.setattr("pipeline.experiments.compare.measured_rate", lambda config: 1000.0)
    out = tmp_path / "out"
    assert main(["compare", str(REPO / "configs" / f"{name}.yaml"), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"compare: {arms} arms" in printed and f"jobs: {jobs} (0 done)" in printed
    assert main(["compare", str(REPO / "configs" / f"{name}.yaml"), "--out", str(out), "--dry-run",
                 "--only", "policy=s4"]) == 0
    printed = capsys.readouterr().out
    per_policy = arms // (2 if name == "compare_fashion_mnist" else 4)
    assert f"compare: {per_policy} arms" in printed and not out.exists()


def test_class_filter_import_renumbers_and_adds_out_of_domain_images_unlabeled(tiny_fashion_dir, tmp_path):
    manifest = import_fashion_mnist(tmp_path / "d", str(tiny_fashion_dir), per_class=10, shard_size=1000,
                                    progress=False, class_filter=ClassFilter(("7", "2"), True))
    assert manifest["classes"] == ["Sneaker", "Pullover"] and manifest["num_classes"] == 2
    assert manifest["splits"]["labeled"]["per_class"] == [10, 10]
    assert manifest["splits"]["test"]["per_class"] == [20, 20] and manifest["splits"]["test"]["count"] == 40
    unlabeled = [s for p in sorted((tmp_path / "d" / "unlabeled").glob("*.tar")) for s in iter_shard(p)]
    assert len(unlabeled) == 600 - 20 and not any("cls" in s for s in unlabeled)  # 8 other classes join, unlabeled
    truth = json.loads((tmp_path / "d" / "unlabeled_truth.json").read_text())
    assert sorted(set(truth.values())) == [0, 1] and len(truth) == 2 * (60 - 10)  # truth only for target classes
    inside = import_fashion_mnist(tmp_path / "e", str(tiny_fashion_dir), per_class=10, shard_size=1000,
                                  progress=False, class_filter=ClassFilter(("Sneaker", "Pullover")))
    assert inside["splits"]["unlabeled"]["count"] == 2 * 50
    with pytest.raises(DataSourceError, match="unknown class 'Boot'"):
        import_fashion_mnist(tmp_path / "f", str(tiny_fashion_dir), per_class=10, progress=False,
                             class_filter=ClassFilter(("Boot", "7")))


def test_class_filter_on_the_command_line(tiny_fashion_dir, tmp_path, capsys):
    assert main(["data", "fashion-mnist", "--source", str(tiny_fashion_dir), "--out", str(tmp_path / "d"),
                 "--labels-per-class", "5", "--classes", "Sneaker,Bag", "--out-of-domain-unlabeled"]) == 0
    assert "imported 2 classes" in capsys.readouterr().out
    assert main(["data", "fashion-mnist", "--source", str(tiny_fashion_dir), "--out", str(tmp_path / "e"),
                 "--out-of-domain-unlabeled"]) == 2
    assert "--out-of-domain-unlabeled needs --classes" in capsys.readouterr().err


def _meta(classes: tuple[str, ...]) -> CheckpointMeta:
    return CheckpointMeta(arch="test_resnet", num_classes=len(classes), in_chans=1, input_size=16, mean=(0.5,),
                          std=(0.25,), class_names=classes, config_hash="x")


def test_a_checkpoint_of_other_classes_starts_the_backbone_and_a_new_head(tmp_path):
    torch.manual_seed(0)
    source = create_model("test_resnet", 5, 1)
    save_checkpoint(tmp_path / "src", source, _meta(("a", "b", "c", "d", "e")))
    for target_classes in (("v", "w", "x", "y", "z"), ("v", "w")):  # as many classes, and fewer
        torch.manual_seed(1)
        model = create_model("test_resnet", len(target_classes), 1)
        fresh_head = model.get_classifier().weight.detach().clone()
        outcome = apply_init(model, InitSource(str(tmp_path / "src"), path=tmp_path / "src"), "test_resnet",
                             target_classes, in_chans=1)
        assert outcome.report.head_reinitialised and "classifier re-initialised" in outcome.describe()
        assert outcome.metrics()["head_reinitialised"] is True
        assert torch.equal(model.get_classifier().weight, fresh_head)
        for name, value in model.state_dict().items():
            if not name.startswith(("fc.", "head.")) and value.ndim:
                assert torch.equal(value, source.state_dict()[name]), name
    same = create_model("test_resnet", 5, 1)
    outcome = apply_init(same, InitSource("x", path=tmp_path / "src"), "test_resnet", ("a", "b", "c", "d", "e"),
                         in_chans=1)
    assert outcome.report is None and torch.equal(same.get_classifier().weight, source.get_classifier().weight)


def test_an_rgb_checkpoint_starts_a_grayscale_model_with_its_stem_summed(tmp_path):
    import dataclasses
    from timm.models import adapt_input_conv
    torch.manual_seed(0)
    classes = ("a", "b", "c", "d", "e")
    source = create_model("test_resnet", 5, 3)  # pretrained on an RGB folder, the same classes
    save_checkpoint(tmp_path / "rgb", source, dataclasses.replace(_meta(classes), in_chans=3))
    model = create_model("test_resnet", 5, 1)
    outcome = apply_init(model, InitSource("x", path=tmp_path / "rgb"), "test_resnet", classes, in_chans=1)
    stem = next(name for name, value in source.state_dict().items() if value.ndim == 4)
    torch.testing.assert_close(model.state_dict()[stem], adapt_input_conv(1, source.state_dict()[stem]))
    assert not outcome.report.missing and not outcome.report.skipped  # every tensor loaded, the stem summed
    assert torch.equal(model.get_classifier().weight, source.get_classifier().weight)  # same classes: same head


def test_timm_weights_not_cached_give_a_clear_error(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{source: shards, path: {tiny_data}}}\n"
                      "teacher: {model: {arch: resnet18, init: 'timm:resnet18.a1_in1k'}, train: {steps: 1}}\n"
                      "runtime: {progress: false, workers: 0}\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "run")]) == 2  # before the import
    err = capsys.readouterr().err
    assert "teacher.model.init: " in err and "resnet18.a1_in1k" in err and "cache" in err and "timm.create_model" in err
    assert not (tmp_path / "run" / "data").exists()
    config.write_text(config.read_text().replace("arch: resnet18,", "arch: resnet34,"))
    assert main(["run", str(config), "--run-dir", str(tmp_path / "run")]) == 2  # weights of another architecture
    assert "'resnet18.a1_in1k' are weights of resnet18, the model is resnet34" in capsys.readouterr().err


def tiny_compare_config(tmp_path: Path, fashion_dir: Path, seeds=(0, 1), inits=("random", "supervised", "simclr"),
                        steps: int = 3) -> Path:
    path = tmp_path / "compare.yaml"
    model = "{arch: test_resnet, input_size: 16}"
    path.write_text(f"""
base:
  data: {{path: {fashion_dir}, classes: ["5", "6", "7", "8", "9"], out_of_domain_unlabeled: true,
          max_unlabeled: 200, shard_size: 100}}
  teacher: {{model: {model}, train: {{lr: 0.05, warmup_epochs: 0}}}}
  student: {{model: {model}, train: {{lr: 0.05, warmup_epochs: 0}}}}
  select: {{min_confidence: 0.0}}  # a 3-step teacher is rarely confident
  runtime: {{progress: false, workers: 0, threads: 1}}
budget: {{steps: {steps}, batch_size: 16}}
sources:
  supervised: {{kind: supervised, data: {{path: {fashion_dir}, classes: ["0", "1", "2", "3", "4"],
                labels_per_class: 20, max_unlabeled: 10}}, train: {{steps: 3, batch_size: 16}}}}
  simclr: {{kind: simclr, train: {{steps: 2, batch_size: 16}}}}
axes: {{init: {list(inits)}, self_training: [off, on], policy: [s1, s4], labels_per_class: [4],
        seeds: {list(seeds)}}}
""")
    return path


def stage_invocations(out: Path) -> dict[str, int]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["invocations"]
            for p in sorted(out.rglob("wall_time.json"))}


def test_tiny_grid_runs_shares_resumes_and_reports(tiny_fashion_dir, tmp_path, capsys):
    config = tiny_compare_config(tmp_path, tiny_fashion_dir, seeds=(0, 1))
    out = tmp_path / "out"
    assert main(["compare", str(config), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "24 arms" in printed and "jobs: 16 (0 done)" in printed and not out.exists()

    # a compare killed in the middle of an arm's teacher continues where it stopped
    killed = subprocess.run([sys.executable, "-m", "pipeline.cli", "compare", str(config), "--out", str(out),
                             "--only", "init=supervised"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SELFTRAIN_KILL_AT_STEP": "2", "OMP_NUM_THREADS": "1"})
    assert killed.returncode != 0
    assert (out / "pretrain" / "supervised" / "pretrain" / "state").exists() or \
        (out / "pretrain" / "supervised" / "pretrain" / "stage.json").exists()
    assert main(["compare", str(config), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "report:" in first
    invocations = stage_invocations(out)
    assert invocations["pretrain/supervised/pretrain"] == 2  # killed once, resumed once
    # every other stage ran exactly once: a teacher shared by the off and on arms is trained once
    assert all(n == 1 for stage, n in invocations.items() if stage != "pretrain/supervised/pretrain"), invocations
    assert sum(stage.endswith("/teacher") for stage in invocations) == 3 * 2 * 2
    assert sum(stage.endswith("/pretrain") or stage.endswith("/ssl_pretrain") for stage in invocations) == 2

    rows = list(csv.DictReader((out / "report" / "summary.csv").open()))
    assert len(rows) == 24 and {r["steps"] for r in rows} == {"3"}
    off = {(r["init"], r["policy"], r["seed"]): r["top1"] for r in rows if r["self_training"] == "off"}
    teacher = json.loads((out / "arms" / "random-s1-l4-s0" / "teacher" / "metrics.json").read_text())
    assert float(off[("random", "s1", "0")]) == pytest.approx(teacher["top1"])
    report = (out / "report" / "report.md").read_text()
    for text in ("random + self-training", "supervised", "simclr", "accuracy_vs_policy.png"):
        assert text in report
    # a verdict on every finding (3-step arms over 2 seeds: which outcome is not the point here)
    findings = [line for line in report.splitlines() if line.startswith("- **")]
    assert {line[4] for line in findings} == set("abcdef")
    assert all(any(f"**: {o}." in line for o in ("reproduced", "not reproduced", "inconclusive")) for line in findings)
    assert (out / "report" / "accuracy_vs_policy.png").stat().st_size > 0
    student = json.loads((out / "arms" / "supervised-s4-l4-s0" / "student_r1" / "metrics.json").read_text())
    assert student["init"]["head_reinitialised"] is True and student["steps"] == 3

    # --only reports every finished arm of the grid, not just the ones it ran
    assert main(["compare", str(config), "--out", str(out), "--only", "init=random,seed=0"]) == 0
    assert len(list(csv.DictReader((out / "report" / "summary.csv").open()))) == 24
    capsys.readouterr()

    # rerun: nothing pending, nothing rerun
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json") if "report" not in p.parts}
    assert main(["compare", str(config), "--out", str(out)]) == 0
    assert "jobs: 16 (16 done)" in capsys.readouterr().out
    assert stage_invocations(out) == invocations
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_compare_under_torchrun_with_two_processes(tiny_fashion_dir, tmp_path):
    config = tiny_compare_config(tmp_path, tiny_fashion_dir, seeds=(0,), steps=2)  # SimCLR stopped at step 2 here
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29553",  # own port: make test runs test files in parallel
                             "-m", "pipeline.cli", "compare", str(config), "--out", str(out)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "report" / "summary.csv").open()))
    assert len(rows) == 3 * 2 * 2
    metrics = json.loads((out / "arms" / "supervised-s4-l4-s0" / "student_r1" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 2
    ssl = json.loads((out / "pretrain" / "simclr" / "ssl_pretrain" / "metrics.json").read_text())
    assert ssl["num_processes"] == 2 and ssl["steps"] == 2
    assert all(n == 1 for n in stage_invocations(out).values())
    assert not list(out.rglob("*.tmp"))
    # a job directory holding a user's files stops both processes before any job runs, the report untouched
    blocked = out / "data" / "l4-s1"
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("a user's file")
    grown = tmp_path / "grown.yaml"
    grown.write_text(config.read_text().replace("seeds: [0]", "seeds: [0, 1]"))
    report = (out / "report" / "report.md").read_text()
    failed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29555", "-m", "pipeline.cli", "compare", str(grown), "--out", str(out)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert failed.returncode != 0 and "1 job(s) of this grid cannot run, nothing was run" in failed.stderr, \
        failed.stderr[-3000:]
    assert (out / "report" / "report.md").read_text() == report
    # a job that fails while the grid runs (an import asking for more labels than a class has) stops both, and
    # the report of the finished arms is written before they exit (the launcher stops process 0 as soon as
    # another exits; with this small report the race is not forced here)
    shutil.rmtree(blocked)
    grown.write_text(config.read_text().replace("labels_per_class: [4]", "labels_per_class: [4, 1000]"))
    (out / "report" / "report.md").unlink()
    failed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29557", "-m", "pipeline.cli", "compare", str(grown), "--out", str(out)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert failed.returncode != 0 and "labels_per_class=1000 must leave some unlabeled" in failed.stderr, \
        failed.stderr[-3000:]
    assert "**Partial grid**: 12 arms finished" in (out / "report" / "report.md").read_text()


@pytest.mark.parametrize("section", ["teacher", "student"])
def test_a_misspelt_architecture_is_refused_before_the_dry_run_probe(section, tmp_path, capsys, monkeypatch):
    """As `selftrain run`'s preflight refuses it: the key and the closest names, before anything is built."""
    def probe(config):
        raise AssertionError("the speed probe ran")
    monkeypatch.setattr("pipeline.experiments.compare.measured_rate", probe)
    path = tmp_path / "compare.yaml"
    path.write_text(f"base:\n  {section}:\n    model: {{arch: resnet10tt}}\n"
                    "axes: {init: [random], self_training: [off, on], policy: [s1], labels_per_class: [4], seeds: [0]}\n")
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (f"selftrain: error: {path}: base.{section}.model.arch: unknown timm architecture 'resnet10tt'; "
            "did you mean resnet10t" in err) and "Traceback" not in err and not out.exists()
    if section == "student":  # without self-training no student is trained: its model is not checked
        grid_config(base={"student": {"model": {"arch": "resnet10tt"}}}, axes={**GRID["axes"], "self_training": [False]})


def test_a_timm_source_not_in_the_cache_is_refused_before_the_first_arm(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    monkeypatch.setattr("pipeline.experiments.compare.measured_rate", lambda config: 1000.0)
    path = tmp_path / "compare.yaml"
    path.write_text("base:\n  teacher:\n    model: {arch: resnet18}\n"
                    "sources: {imnet: {kind: timm, path: resnet18.a1_in1k}}\n"
                    "axes: {init: [random, imnet], self_training: [off], policy: [s1], labels_per_class: [4], "
                    "seeds: [0]}\n")
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "sources.imnet.path: timm weights 'resnet18.a1_in1k' are not in the local cache" in err and not out.exists()


def test_a_checkpoint_source_that_is_not_there_is_refused_before_the_first_arm(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pipeline.experiments.compare.measured_rate", lambda config: 1000.0)
    path = tmp_path / "compare.yaml"
    path.write_text(f"sources: {{mine: {{kind: checkpoint, path: {tmp_path}/no-such-ckpt}}}}\n"
                    "axes: {init: [random, mine], self_training: [off], policy: [s1], labels_per_class: [4], "
                    "seeds: [0]}\n")
    assert main(["compare", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert f"sources.mine.path: {tmp_path}/no-such-ckpt does not exist" in capsys.readouterr().err


def test_a_sources_partial_train_keeps_its_stages_other_defaults(tmp_path):
    """`train: {steps: 300}` gave SimCLR s1 views and SGD at lr 0.1 (TrainConfig's defaults), where the same key
    in a run config's ssl_pretrain section keeps that stage's s4, AdamW and lr."""
    from pipeline.config.sections import PretrainConfig, SSLPretrainConfig, TrainConfig
    path = tmp_path / "compare.yaml"
    path.write_text("sources: {simclr: {kind: simclr, train: {steps: 300}}, sup: {kind: supervised, data: "
                    "{source: fashion-mnist}, train: {steps: 300}}}\naxes: {init: [random, simclr, sup]}\n")
    sources = load_compare_config(path).sources
    for name, stage in (("simclr", SSLPretrainConfig().train), ("sup", PretrainConfig().train)):
        # epochs is unused once steps is given: TrainConfig's, as grids made before resolved it (they still match)
        assert sources[name].train == dataclasses.replace(stage, steps=300, epochs=TrainConfig().epochs)


def test_compare_refuses_an_out_holding_the_users_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pipeline.experiments.compare.measured_rate", lambda config: 1000.0)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = REPO / "configs" / "compare_fashion_mnist.yaml"
    assert main(["compare", str(config), "--out", str(out), "--only", "policy=s1,labels_per_class=10"]) == 2
    assert f"{out} holds files this tool did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_grid_rerun_with_another_config_is_refused_but_new_axes_extend_it(tmp_path):
    """Finished arms belong to the config that made them: reporting them under a changed learning rate
    would be wrong; a new seed or label count only adds arms."""
    from pipeline.experiments.compare import recorded_yaml, refuse_changed_config, resolved_yaml

    out = tmp_path / "grid"
    out.mkdir()
    (out / "compare.yaml").write_text(resolved_yaml(grid_config()))
    refuse_changed_config(out, resolved_yaml(grid_config()))  # the same config: fine
    refuse_changed_config(out, resolved_yaml(grid_config(axes={**GRID["axes"], "seeds": [0, 1, 2]})))
    changed = grid_config(base={"teacher": {"train": {"lr": 0.01}}})
    with pytest.raises(ConfigError, match=r"holds a grid made with another config \(base.teacher.train.lr: 0.1 -> 0.01"):
        refuse_changed_config(out, resolved_yaml(changed))
    runtime = grid_config(base={"runtime": {"threads": 2, "workers": 0, "progress": False}})
    refuse_changed_config(out, resolved_yaml(runtime))  # settings that do not change results, as summarize
    # a new source with its init only adds arms (any change to `sources` was refused); a used one may not change
    (tmp_path / "w.pt").write_bytes(b"")
    grown = grid_config(axes={**GRID["axes"], "init": ["random", "supervised", "simclr", "mine"]},
                        sources={**GRID["sources"], "mine": {"kind": "checkpoint", "path": str(tmp_path / "w.pt")}})
    refuse_changed_config(out, resolved_yaml(grown))
    other = grid_config(sources={**GRID["sources"], "simclr": {"kind": "simclr", "temperature": 0.5}})
    with pytest.raises(ConfigError, match=r"sources.simclr.temperature: 0.2 -> 0.5"):
        refuse_changed_config(out, resolved_yaml(other))
    # dropping a source, changing it, and adding it back: its runs are still the old definition's
    dropped = grid_config(axes={**GRID["axes"], "init": ["random", "supervised"]},
                          sources={**GRID["sources"], "simclr": {"kind": "simclr", "temperature": 0.5}})
    refuse_changed_config(out, resolved_yaml(dropped))
    (out / "compare.yaml").write_text(recorded_yaml(out, resolved_yaml(dropped)))
    with pytest.raises(ConfigError, match=r"sources.simclr.temperature: 0.2 -> 0.5"):
        refuse_changed_config(out, resolved_yaml(other))


def test_spellings_of_one_policy_are_one_axis_value():
    """'s4' and 's4-n2-m10' would train the same models twice and shrink the verdicts' SE."""
    with pytest.raises(ConfigError, match=r"axes.policy: s4 and S4-n2-m10 are one policy \(defaults filled in: "
                                          r"s4-n2-m10-j0.5:2.0\)"):
        grid_config(axes={**GRID["axes"], "policy": ["s1", "s4", "S4-n2-m10"]})


def test_a_started_pretraining_keeps_its_import_when_the_axes_change(tmp_path):
    """SimCLR pretrains on one import; putting another label count first must not move a started job."""
    from pipeline.experiments.compare_grid import data_dir, pretrain_job

    config = grid_config()
    first = pretrain_job(config, "simclr", tmp_path)
    assert first is not None and first.config.data.path == str(data_dir(tmp_path, 10, 0))
    data_dir(tmp_path, 10, 0).mkdir(parents=True)
    RunDir(first.run_dir(tmp_path)).root.mkdir(parents=True)
    RunDir(first.run_dir(tmp_path)).config_path.write_text(
        f"data:\n  source: shards\n  path: {data_dir(tmp_path, 10, 0)}\n")
    reordered = grid_config(axes={**GRID["axes"], "labels_per_class": [5, 10, 200], "seeds": [3, 0, 1]})
    again = pretrain_job(reordered, "simclr", tmp_path)
    assert again is not None and again.config.data.path == str(data_dir(tmp_path, 10, 0))


def test_a_grid_keeps_its_out_spelling_and_a_failed_job_leaves_a_partial_report(tiny_fashion_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """Resumed as /abs/rel, a grid started as `rel` refused every unfinished arm (its runs record their paths as
    typed); a failing job stopped the grid before the report, which kept an older invocation's arms; --dry-run
    planned a grid the real run would refuse."""
    monkeypatch.chdir(tmp_path)
    config = tiny_compare_config(tmp_path, tiny_fashion_dir, seeds=(0,), inits=("random",))
    text = config.read_text().replace("self_training: [off, on], policy: [s1, s4]", "self_training: [off], policy: [s1]")
    config.write_text(text)
    assert main(["compare", str(config), "--out", "rel"]) == 0 and "report:" in capsys.readouterr().out
    grown = tmp_path / "grown.yaml"
    grown.write_text(text.replace("seeds: [0]", "seeds: [0, 1]"))
    blocker = tmp_path / "rel" / "arms" / "random-s1-l4-s1"
    blocker.mkdir(parents=True)
    (blocker / "notes.txt").write_text("a user's file")  # the new arm's job would be refused: named up front
    for extra in (["--dry-run"], []):
        assert main(["compare", str(grown), "--out", str(tmp_path / "rel"), *extra]) == 2
        err = capsys.readouterr().err
        assert "1 job(s) of this grid cannot run, nothing was run: arms/random-s1-l4-s1: " in err
        assert "is not a selftrain run directory" in err and not (tmp_path / "rel" / "data" / "l4-s1").exists()
    shutil.rmtree(blocker)
    import pipeline.experiments.compare as compare_module

    real_run_up_to = compare_module.run_up_to

    def failing(job_config, run_dir, target, state):  # the new arm fails while it runs
        if Path(run_dir).name == "random-s1-l4-s1":
            raise RunDirError(f"{run_dir}: simulated failure")
        real_run_up_to(job_config, run_dir, target, state)

    monkeypatch.setattr(compare_module, "run_up_to", failing)
    assert main(["compare", str(grown), "--out", str(tmp_path / "rel")]) == 2  # the absolute spelling resumes
    err = capsys.readouterr().err
    assert "compare: job arms/random-s1-l4-s1 stopped" in err and "simulated failure" in err
    monkeypatch.setattr(compare_module, "run_up_to", real_run_up_to)
    report = (tmp_path / "rel" / "report" / "report.md").read_text()
    assert "**Partial grid**: 1 arms finished; not finished: arms/random-s1-l4-s1 failed" in report
    assert json.loads((tmp_path / "rel" / "report" / "metrics.json").read_text())["partial"]
    changed = tmp_path / "changed.yaml"
    changed.write_text(text.replace("budget: {steps: 3", "budget: {steps: 6"))
    assert main(["compare", str(changed), "--out", "rel", "--dry-run"]) == 2
    assert "holds a grid made with another config (budget.steps: 3 -> 6" in capsys.readouterr().err
    shutil.copytree(tmp_path / "rel", tmp_path / "copy")  # a copied grid is reported where it is ...
    assert main(["compare", str(config), "--out", str(tmp_path / "copy")]) == 0
    assert "report: " in capsys.readouterr().out
    assert main(["compare", str(grown), "--out", str(tmp_path / "copy")]) == 2  # ... but grows only where it was made
    assert "where it was made (moved or copied since)" in capsys.readouterr().err


def test_the_cost_estimate_counts_only_the_stages_a_pending_job_has_left(tmp_path):
    """A self-trained arm whose teacher finished (an interrupted grid) still has its rounds to run, not its teacher."""
    from pipeline.experiments.compare_grid import job_images

    config = grid_config()
    job = next(j for j in make_plan(config, tmp_path, "init=random").jobs if j.kind == "arms" and j.config.student.rounds)
    c = job.config
    teacher = c.teacher.train.total_steps(1) * c.teacher.train.batch_size
    rounds = c.student.rounds * c.student.train.total_steps(1) * c.student.train.batch_size * (1 + c.student.unlabeled_ratio)
    assert job_images(job) == teacher + rounds > rounds > 0
    assert job_images(job, lambda stage: stage == "teacher") == rounds
    assert job_images(job, lambda stage: True) == 0


def test_keep_going_runs_the_jobs_after_a_failed_one_and_names_it(tiny_fashion_dir, tmp_path, capsys, monkeypatch):
    """A grid run overnight stopped at its first failed job, and the jobs after it waited for the morning."""
    monkeypatch.chdir(tmp_path)
    config = tiny_compare_config(tmp_path, tiny_fashion_dir, seeds=(0,), inits=("random",))
    config.write_text(config.read_text().replace("self_training: [off, on], policy: [s1, s4]",
                                                 "self_training: [off], policy: [s1]"))
    assert main(["compare", str(config), "--out", "out"]) == 0
    config.write_text(config.read_text().replace("seeds: [0]", "seeds: [0, 1, 2]"))
    blocker = tmp_path / "out" / "arms" / "random-s1-l4-s1"
    blocker.mkdir(parents=True)
    (blocker / "notes.txt").write_text("a user's file")  # the seed-1 arm's job is refused
    capsys.readouterr()
    assert main(["compare", str(config), "--out", "out", "--keep-going"]) == 1
    captured = capsys.readouterr()
    assert "compare: --keep-going: on to the next job" in captured.err
    assert re.search(r"1 of \d+ job\(s\) failed: arms/random-s1-l4-s1 failed \(RunDirError", captured.err)
    assert (tmp_path / "out" / "arms" / "random-s1-l4-s2" / "teacher" / "DONE").exists()  # the job after it ran
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "**Partial grid**: 2 arms finished; not finished: arms/random-s1-l4-s1 failed" in report
    (blocker / "notes.txt").unlink()
    assert main(["compare", str(config), "--out", "out", "--keep-going"]) == 0  # the retry finishes the grid
    assert "Partial grid" not in (tmp_path / "out" / "report" / "report.md").read_text()


def test_only_that_matches_no_arm_lists_the_values_the_grid_has():
    with pytest.raises(ConfigError, match=r"matches no arm of the grid \(its values: self_training: off, on\)"):
        select_arms(expand(grid_config()), "self_training=false")
