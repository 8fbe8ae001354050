"""Teacher stage end to end on tiny data, kill-and-resume, refused resume, CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from conftest import TINY_TEACHER, tiny_config
from pipeline.cli import main
from pipeline.core.faults import env_name
from pipeline.core.rundir import RunDir

KILL_ENV = env_name("step")

TINY = TINY_TEACHER + ["teacher.train.epochs=6", "student.rounds=0"]


def write_config(tmp_path: Path, data_dir: Path) -> Path:
    return tiny_config(tmp_path, data_dir)


def run_cli(config: Path, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run_dir)]
    for item in TINY:
        args += ["--set", item]
    return subprocess.run(args + list(extra), capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "teacher" / "checkpoint" / "model.safetensors"))


def test_teacher_end_to_end(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data)
    args = ["run", str(config), "--run-dir", str(tmp_path / "run")] + [x for s in TINY for x in ("--set", s)]
    assert main(args) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "teacher" / "metrics.json").read_text())
    assert {"top1", "ece", "num_test", "per_class"} <= set(metrics)
    assert metrics["num_test"] == 200
    assert metrics["top1"] > 0.3  # 10 learnable classes: far above chance (0.1)
    assert metrics["policy"].startswith("s1")
    meta = json.loads((run / "teacher" / "checkpoint" / "meta.json").read_text())
    assert meta["arch"] == "test_resnet" and meta["num_classes"] == 10 and meta["input_size"] == 16
    model = timm.create_model(meta["arch"], num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    model.load_state_dict(weights(run))
    assert (run / "teacher" / "DONE").exists() and (run / "config.yaml").exists()
    assert not (run / "teacher" / "state").exists()  # a finished stage keeps its checkpoint, not its state
    # a rerun skips the finished stage
    assert main(args) == 0


def test_kill_and_resume_gives_identical_weights(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data)
    straight = run_cli(config, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    killed = run_cli(config, tmp_path / "killed", env={KILL_ENV: "13"})
    assert killed.returncode == -9  # SIGKILL between checkpoints (saved at 10, killed at 13)
    assert not (tmp_path / "killed" / "teacher" / "DONE").exists()
    clock = tmp_path / "killed" / "teacher" / "wall_time.json"
    os.utime(clock, (clock.stat().st_mtime - 120,) * 2)  # the killed process's heartbeat has stopped
    state = RunDir(tmp_path / "killed").stage_state("teacher")
    total = re.search(r"\[teacher\] .*?(\d+) steps", straight.stdout + straight.stderr).group(1)
    assert state.startswith("resumable (stopped after ") and f"resumes from step 10 of {total};" in state, state
    resumed = run_cli(config, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 10" in resumed.stdout + resumed.stderr
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def test_resume_with_other_architecture_is_refused(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data)
    killed = run_cli(config, tmp_path / "run", env={KILL_ENV: "7"})
    assert killed.returncode == -9
    recorded = {name: (tmp_path / "run" / name).read_text() for name in ("config.yaml", "stages.json")}
    other = run_cli(config, tmp_path / "run", "--set", "teacher.model.arch=resnet10t", "--set", "student.rounds=2")
    assert other.returncode == 2
    assert "model.arch: 'test_resnet' -> 'resnet10t'" in other.stderr
    assert "--from teacher" in other.stderr
    # the refused config is not recorded as the run's (status would list its rounds, summarize compare it)
    assert {name: (tmp_path / "run" / name).read_text() for name in recorded} == recorded


def test_status_and_only(tiny_data, tmp_path, capsys):
    config = write_config(tmp_path, tiny_data)
    run = tmp_path / "run"
    assert main(["run", str(config), "--run-dir", str(run), "--only", "data"]
                + [x for s in TINY for x in ("--set", s)]) == 0
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "data" in out and "done" in out and "teacher" in out and "pending" in out
    assert main(["run", str(config), "--run-dir", str(run), "--only", "nope"]) == 2


def test_tensorboard_tracker_writes_events(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data)
    args = ["run", str(config), "--run-dir", str(tmp_path / "run"), "--only", "data"]
    assert main(args + [x for s in TINY for x in ("--set", s)]) == 0
    args[-1] = "teacher"
    sets = TINY + ["teacher.train.epochs=2", "runtime.log_with=tensorboard"]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))


def test_compiled_training_saves_plain_weights_and_resumes(tiny_data, tmp_path):
    """runtime.compile (accelerate's dynamo backend; aot_eager traces without generating code):
    the checkpoint has the plain model's tensor names and a killed run resumes to the same weights."""
    config = write_config(tmp_path, tiny_data)
    compiled = ["--only", "data"], ["--only", "teacher", "--set", "runtime.compile=aot_eager"]
    for run in ("straight", "killed"):
        assert run_cli(config, tmp_path / run, *compiled[0]).returncode == 0
    result = run_cli(config, tmp_path / "straight", *compiled[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model compiled with torch.compile" in result.stdout + result.stderr
    plain = timm.create_model("test_resnet", num_classes=10, in_chans=1).state_dict()
    straight = weights(tmp_path / "straight")
    assert straight.keys() == plain.keys()
    assert run_cli(config, tmp_path / "killed", *compiled[1], env={KILL_ENV: "7"}).returncode == -9
    again = run_cli(config, tmp_path / "killed", *compiled[1])
    assert again.returncode == 0 and "resuming from step 5" in again.stdout + again.stderr
    resumed = weights(tmp_path / "killed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_warm_up_as_long_as_the_run_is_warned_about(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data)
    result = run_cli(config, tmp_path / "run", "--set", "teacher.train.steps=3", "--set", "teacher.train.warmup_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[teacher] warning: the warm-up (7 steps: warmup_epochs 1.0 x 7 steps an epoch) is as long as the run " \
           "(3 steps)" in result.stdout


def test_only_report_with_another_config_is_refused(tiny_teacher_run, tmp_path, capsys):
    """`--only report --set seed=7` rewrote the run's config.yaml and reported its stages under that seed; a
    finished stage the config no longer has (a round beyond student.rounds) was left out silently."""
    import json
    import shutil

    from conftest import TINY_TEACHER, set_args
    from pipeline.cli import main

    config, made = tiny_teacher_run
    run = tmp_path / "run"
    shutil.copytree(made, run)
    common = set_args(TINY_TEACHER + ["student.rounds=0"])
    for stage in ("pseudo_label_r1", "select_r1"):  # what a teacher-only run's report describes besides it
        assert main(["run", str(config), "--run-dir", str(run), "--only", stage] + common) == 0
    recorded = (run / "config.yaml").read_text()
    only_report = ["run", str(config), "--run-dir", str(run), "--only", "report"] + common
    assert main(only_report + ["--set", "seed=7"]) == 2
    assert "stage 'teacher' in " in (err := capsys.readouterr().err) and "(seed: 0 -> 7)" in err
    assert (run / "config.yaml").read_text() == recorded
    planned = json.loads((run / "stages.json").read_text())
    (run / "stages.json").write_text(json.dumps({"stages": planned["stages"] + ["student_r2"]}))
    (run / "student_r2").mkdir()
    (run / "student_r2" / "DONE").write_text("")
    assert main(only_report) == 2
    assert "student_r2 done in" in capsys.readouterr().err
    shutil.rmtree(run / "student_r2")
    assert main(only_report) == 0
    assert "labeled images per class" in (run / "report" / "report.md").read_text()


def test_weights_that_diverged_are_not_saved_as_done():
    """A bf16 teacher at 16 px saved 2,208 NaN weights as DONE (its top-1 looked fine); the export failed later
    with onnxruntime's 'scale issue', naming neither the model nor the NaNs."""
    import pytest
    import torch

    from pipeline.engine.training import TrainingDiverged, check_finite
    from teachers.models import create_model

    model = create_model("test_resnet", 10, 1)
    check_finite(model, "teacher")
    with torch.no_grad():
        next(model.parameters())[0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    with pytest.raises(TrainingDiverged, match=r"\[teacher\] \S+ holds 2 NaN or infinite values after training"):
        check_finite(model, "teacher")
