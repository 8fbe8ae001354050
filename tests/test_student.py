"""Noisy Student stage: mixture sampling, noise on/off, two rounds, kill-and-resume within and between rounds."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TEACHER, set_args
from pipeline.core.faults import env_name
from pipeline.data.loader import Source, StepBatchSampler
from teachers.models import create_model

STUDENT = ["student.model.arch=test_resnet", "student.model.input_size=16", "student.train.epochs=1",
           "student.train.batch_size=16", "student.train.lr=0.05", "student.train.save_every_steps=2",
           "student.train.warmup_epochs=0", "student.unlabeled_ratio=2", "select.per_class=20",
           "pseudo_label.batch_size=100", "runtime.threads=1", "select.min_confidence=0.0",
           # warm start as the shipped config; EMA so kill-and-resume covers its saved state
           "student.model.init=teacher", "student.train.ema_decay=0.9"]


def test_mixture_honours_ratio_and_repeats():
    labeled = Source(np.arange(7), 4)
    repeats = np.array([0, 1, 3, 2, 0, 1])
    unlabeled = Source(np.repeat(np.arange(6), repeats), 8)  # one epoch = 7 positions
    sampler = StepBatchSampler([labeled, unlabeled], total_steps=7, seed=0)
    batches = list(sampler)
    assert all(sum(1 for s, _, _ in b if s == 0) == 4 and sum(1 for s, _, _ in b if s == 1) == 8 for b in batches)
    unl = [i for b in batches for s, i, _ in b if s == 1]  # 56 positions = 8 unlabeled epochs
    for epoch in range(8):
        counts = np.bincount(unl[epoch * 7:(epoch + 1) * 7], minlength=6)
        np.testing.assert_array_equal(counts, repeats)
    resumed = list(StepBatchSampler([labeled, unlabeled], total_steps=7, seed=0, start_step=3))
    assert resumed == batches[3:]  # the position is a function of the step, no replay
    ranks = [list(StepBatchSampler([labeled, unlabeled], 7, 0, 0, r, 2)) for r in (0, 1)]
    for step, batch in enumerate(batches):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)


def test_dropout_and_drop_path_follow_train_and_eval_modes():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1, drop_rate=0.5, drop_path_rate=0.3)
    x = torch.randn(4, 1, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # noise in train mode
    model.eval()
    assert torch.equal(model(x), model(x))  # deterministic in eval mode
    quiet = create_model("resnet18", 10, 1)
    quiet.load_state_dict(model.state_dict())
    quiet.eval()
    torch.testing.assert_close(quiet(x), model(x))


def cli(config: Path, run: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run)]
    args += set_args(TINY_TEACHER + STUDENT) + list(extra)
    return subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def weights(run: Path, stage: str) -> dict:
    return load_file(str(run / stage / "checkpoint" / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def two_round_run(tiny_teacher_run, tmp_path_factory):
    config, teacher_run = tiny_teacher_run
    run = tmp_path_factory.mktemp("student") / "run"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    result = cli(config, run, "--set", "student.rounds=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return config, run, result


def test_status_of_a_finished_run_shows_every_stage_done(two_round_run, capsys):
    from pipeline.cli import main
    _, run, _ = two_round_run
    assert main(["status", str(run)]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [name for name, _ in lines] == ["data", "teacher", "pseudo_label_r1", "select_r1", "student_r1",
                                           "pseudo_label_r2", "select_r2", "student_r2", "report"]
    assert {state for _, state in lines} == {"done"}


def test_status_lists_the_stages_without_importing_torch(two_round_run):
    """`selftrain status` took 5 s importing torch through the stage graph; it reads RUN/stages.json instead."""
    import os
    import subprocess
    import sys

    from pipeline.config.loading import load_config
    from pipeline.stages.graph import build_graph

    _, run, _ = two_round_run
    probe = ("import sys\nfrom pipeline.cli import main\n"
             f"code = main(['status', {str(run)!r}])\nprint(code, 'torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stderr == "0 False\n", result.stderr[-2000:]
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == build_graph(load_config(run / "config.yaml")).names
    # `selftrain status RUN | head -1`: a reader that left before the output came; no BrokenPipeError traceback
    read_end, write_end = os.pipe()
    os.close(read_end)
    cut = subprocess.run([sys.executable, "-c", probe], stdout=write_end, stderr=subprocess.PIPE, text=True,
                         timeout=120)
    os.close(write_end)
    assert cut.stderr == "1 False\n", cut.stderr[-2000:]  # no traceback, and still no torch


def test_two_rounds_end_to_end(two_round_run):
    _, run, result = two_round_run
    for stage in ("pseudo_label_r1", "select_r1", "student_r1", "pseudo_label_r2", "select_r2", "student_r2"):
        assert (run / stage / "DONE").exists(), stage
    r1 = json.loads((run / "student_r1" / "metrics.json").read_text())
    r2 = json.loads((run / "student_r2" / "metrics.json").read_text())
    assert r1["round"] == 1 and r2["round"] == 2
    assert 0 <= r1["teacher_agreement"] <= 1 and "top1" in r2 and "ece" in r2
    assert {"loss_labeled", "loss_pseudo"} <= set(r1["loss_history"][-1])
    meta2 = json.loads((run / "student_r2" / "checkpoint" / "meta.json").read_text())
    meta1 = json.loads((run / "student_r1" / "checkpoint" / "meta.json").read_text())
    assert meta2["lineage"]["teacher_sha256"] == meta1["weights_sha256"]  # round 2 learned from round 1
    assert meta1["lineage"]["init"] == str(run / "teacher" / "checkpoint")  # init: teacher = the round's teacher
    assert meta2["lineage"]["init"] == str(run / "student_r1" / "checkpoint")
    assert r1["ema"]["decay"] == 0.9 and "raw_top1" in r1["ema"]
    labels2 = json.loads((run / "pseudo_label_r2" / "manifest.json").read_text())
    assert labels2["teacher_sha256"] == meta1["weights_sha256"]
    assert (run / "report" / "report.md").exists() and (run / "report" / "accuracy_by_round.png").exists()
    assert "student_r2" in (run / "report" / "summary.csv").read_text()
    assert "| teacher |" in result.stdout


def test_student_never_reads_hidden_labels(two_round_run, tmp_path):
    """Pool targets are the teacher's sidecar labels, and loading works without the truth file."""
    from pipeline.data.imageset import open_data
    from pipeline.data.pool import load_selected_pool
    from teachers.sidecar import read_sidecar, soft_labels
    config, run, _ = two_round_run
    data_dir = tmp_path / "data"
    shutil.copytree(Path(config.read_text().split("path: ")[1].strip()), data_dir)
    (data_dir / "unlabeled_truth.json").unlink()  # the hidden labels are not there to read
    from pipeline.core.rundir import RunDir
    from pipeline.data.pool import LabelForm
    pool = load_selected_pool(open_data(data_dir), RunDir(run, data_dir), "pseudo_label_r1", "select_r1",
                              LabelForm("soft", 1.0, 0.0), progress=False)
    expected = {}
    for path in sorted((run / "pseudo_label_r1").glob("*.labels.npz")):
        sidecar = read_sidecar(path)
        for key, row in zip(sidecar.keys, soft_labels(sidecar)):
            expected[str(key)] = row
    assert len(pool.keys) > 0
    for key, target in zip(pool.keys, pool.targets):
        np.testing.assert_array_equal(target, expected[key])


def test_kill_inside_and_between_rounds_resumes_to_same_weights(two_round_run, tiny_teacher_run, tmp_path):
    config, teacher_run = tiny_teacher_run
    _, straight, _ = two_round_run
    run = tmp_path / "killed"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    inside = cli(config, run, "--set", "student.rounds=2", env={env_name("step"): "3"})
    assert inside.returncode == -9  # inside round 1 student (saved at step 2)
    assert not (run / "student_r1" / "DONE").exists()
    between = cli(config, run, "--set", "student.rounds=2", env={env_name("batch"): "1"})
    assert between.returncode == -9  # round 1 finished; killed in round 2's pseudo-labeling
    assert (run / "student_r1" / "DONE").exists() and "resuming from step 2" in between.stdout + between.stderr
    finished = cli(config, run, "--set", "student.rounds=2")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same(weights(straight, "student_r1"), weights(run, "student_r1"))
    assert_same(weights(straight, "student_r2"), weights(run, "student_r2"))


def test_student_at_a_larger_input_size_is_compared_with_the_teacher_at_its_own(tiny_teacher_run, tmp_path):
    """Resolution is a student-scaling axis: the teacher keeps its own preprocessing when agreement is measured."""
    from accelerate import Accelerator

    from pipeline.data.imageset import load_labeled_split, open_data
    from pipeline.engine.predict import checkpoint_logits
    config, teacher_run = tiny_teacher_run
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    result = cli(config, run, "--set", "student.model.input_size=24")
    assert result.returncode == 0, result.stderr[-3000:]
    student_dir, teacher_dir = run / "student_r1" / "checkpoint", run / "teacher" / "checkpoint"
    assert json.loads((student_dir / "meta.json").read_text())["input_size"] == 24
    assert json.loads((teacher_dir / "meta.json").read_text())["input_size"] == 16
    test = load_labeled_split(open_data(Path(config.read_text().split("path: ")[1].strip())), "test")
    accelerator = Accelerator(cpu=True)
    student, teacher = (checkpoint_logits(accelerator, d, 10, test.images, 500, 0, True, "eval", False)
                        for d in (student_dir, teacher_dir))
    metrics = json.loads((run / "student_r1" / "metrics.json").read_text())
    assert metrics["teacher_agreement"] == pytest.approx(float((student.argmax(1) == teacher.argmax(1)).mean()))


def test_labeled_rows_a_step_are_capped_at_the_labeled_set_as_for_the_teacher(tiny_teacher_run, tmp_path):
    """A batch larger than the labeled set does not draw labeled images twice in one step (compare's arms with
    and without self-training then see the same labeled rows); the pseudo-labeled part keeps its ratio."""
    config, teacher_run = tiny_teacher_run
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    result = cli(config, run, "--set", "student.train.batch_size=256")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "student_r1" / "metrics.json").read_text())
    assert metrics["num_labeled"] == metrics["labeled_batch"] == 200 and metrics["pseudo_batch"] == 2 * 256
    assert json.loads((run / "teacher" / "metrics.json").read_text())["labeled_batch"] == 32  # its own, uncapped


def test_deeper_student_is_grown_from_a_shallower_checkpoint(tiny_teacher_run, tmp_path):
    """`model.init` of another depth (resnet18 checkpoint, resnet34 student) warm-starts instead of being refused."""
    from pipeline.data.sources.fashion_mnist import CLASS_NAMES
    from teachers.checkpoint import CheckpointMeta, save_checkpoint
    config, teacher_run = tiny_teacher_run
    run, init = tmp_path / "run", tmp_path / "r18"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    save_checkpoint(init, create_model("resnet18", 10, 1),
                    CheckpointMeta(arch="resnet18", num_classes=10, in_chans=1, input_size=16, mean=(0.3,),
                                   std=(0.3,), class_names=CLASS_NAMES, config_hash="x"))  # the data's classes
    result = cli(config, run, "--set", "student.model.arch=resnet34", "--set", f"student.model.init={init}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resnet34 grown from resnet18 at {init}: 122 tensors copied" in result.stdout + result.stderr
    meta = json.loads((run / "student_r1" / "checkpoint" / "meta.json").read_text())
    assert meta["arch"] == "resnet34" and meta["lineage"]["init"] == str(init)


def test_rows_that_do_not_split_evenly_over_the_processes_are_warned_about():
    with pytest.warns(UserWarning, match=r"do not split evenly over 3 processes \(source 1: 8 rows\)"):
        StepBatchSampler([Source(np.arange(7), 6), Source(np.arange(9), 8)], total_steps=2, seed=0, rank=0, world=3)


def test_a_student_left_done_while_its_selection_was_redone_is_refused(tiny_teacher_run, tmp_path):
    """`--from select_r1` with the round out of the graph forgets the selection but not the student; the
    student's inputs include the pool it trained on, so coming back it is refused, not passed off as new."""
    config, teacher_run = tiny_teacher_run
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    assert cli(config, run).returncode == 0
    redone = cli(config, run, "--from", "select_r1", "--set", "student.rounds=0", "--set", "select.min_confidence=0.5")
    assert redone.returncode == 0, redone.stderr[-3000:]
    back = cli(config, run, "--set", "select.min_confidence=0.5")
    assert back.returncode == 2 and "stage 'student_r1'" in back.stderr and "pool_sha256" in back.stderr
