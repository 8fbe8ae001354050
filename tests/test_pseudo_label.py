"""Pseudo-label and select stages: sidecars, resume after SIGKILL, 2 processes, refusals, bad samples."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from conftest import TINY_TEACHER, record_as_made_before, set_args
from pipeline.core.faults import env_name
from pipeline.core.rundir import RunDir
from teachers.sidecar import read_sidecar

PL = ["pseudo_label.batch_size=30", "runtime.threads=1", "student.rounds=0"]


def copy_run(tiny_teacher_run, tmp_path: Path, name: str = "run") -> tuple[Path, Path]:
    config, run = tiny_teacher_run
    target = tmp_path / name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("lock"))
    return config, target


def cli_args(config: Path, run: Path, *extra: str, launcher: list[str] | None = None, workers: int = 2) -> list[str]:
    base = launcher or [sys.executable, "-m", "pipeline.cli"]
    if launcher:
        base = base + ["-m", "pipeline.cli"]
    return base + ["run", str(config), "--run-dir", str(run)] + set_args(
        TINY_TEACHER + PL + [f"runtime.workers={workers}"]) + list(extra)


def cli(config: Path, run: Path, *extra: str, env: dict | None = None, launcher: list[str] | None = None,
        workers: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(config, run, *extra, launcher=launcher, workers=workers), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def sidecars(run: Path) -> dict[str, object]:
    return {p.name: read_sidecar(p) for p in sorted((run / "pseudo_label_r1").glob("*.labels.npz"))}


def assert_same_sidecars(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        assert list(a[name].keys) == list(b[name].keys), name
        np.testing.assert_array_equal(a[name].logits, b[name].logits)
        np.testing.assert_array_equal(a[name].shift, b[name].shift)


def test_pseudo_label_and_select(tiny_teacher_run, tmp_path):
    config, run = copy_run(tiny_teacher_run, tmp_path)
    # top-k asked for above 5 classes, but k=20 of 10 classes is every class: full sidecars, and the manifest says so
    done = cli(config, run, "--set", "select.per_class=50", "--set", "pseudo_label.topk_above_classes=5",
               "--set", "pseudo_label.topk=20")
    assert done.returncode == 0, done.stderr
    labels = sidecars(run)
    assert sum(len(s) for s in labels.values()) == 400
    first = next(iter(labels.values()))
    assert first.logits.dtype == np.float16 and first.logits.shape[1] == 10
    assert first.meta["teacher_sha256"] and first.meta["source_sha256"]
    manifest = json.loads((run / "pseudo_label_r1" / "manifest.json").read_text())
    assert manifest["num_labeled"] == 400 and manifest["num_skipped"] == 0
    assert manifest["layout"] == "full" and manifest["topk"] is None
    metrics = json.loads((run / "pseudo_label_r1" / "metrics.json").read_text())
    assert 0 <= metrics["pool_accuracy"] <= 1 and "0.3" in metrics["accuracy_above"]
    select = json.loads((run / "select_r1" / "metrics.json").read_text())
    table = select["selection"]["per_class_table"]
    plans = {p.name: np.load(p) for p in (run / "select_r1").glob("*.plan.npz")}
    total_copies = sum(int(p["repeats"].sum()) for p in plans.values())
    assert total_copies == sum(r["copies"] for r in table)
    assert all(r["copies"] in (0, 50) for r in table)
    assert (run / "select_r1" / "class_counts.png").stat().st_size > 1000


def test_kill_and_resume_gives_identical_sidecars(tiny_teacher_run, tmp_path):
    config, straight = copy_run(tiny_teacher_run, tmp_path, "straight")
    _, killed = copy_run(tiny_teacher_run, tmp_path, "killed")
    assert cli(config, straight, "--only", "pseudo_label_r1").returncode == 0
    dead = cli(config, killed, "--only", "pseudo_label_r1", env={env_name("batch"): "10"})
    assert dead.returncode == -9
    finished = len(list((killed / "pseudo_label_r1").glob("*.labels.npz")))
    assert 0 < finished < 4 and not (killed / "pseudo_label_r1" / "manifest.json").exists()
    clock = killed / "pseudo_label_r1" / "wall_time.json"
    os.utime(clock, (clock.stat().st_mtime - 120,) * 2)  # the killed process's heartbeat has stopped
    state = RunDir(killed).stage_state("pseudo_label_r1")
    assert state.startswith("resumable (stopped after ") and f", {finished} of 4 shards done;" in state, state
    again = cli(config, killed, "--only", "pseudo_label_r1")
    assert again.returncode == 0, again.stderr
    assert f"{4 - finished} of 4 shards to label" in again.stdout + again.stderr
    assert_same_sidecars(sidecars(straight), sidecars(killed))


def test_a_resume_may_lower_the_batch_size_and_keeps_the_finished_sidecars(tiny_teacher_run, tmp_path):
    config, killed = copy_run(tiny_teacher_run, tmp_path, "killed")
    assert cli(config, killed, "--only", "pseudo_label_r1", env={env_name("batch"): "10"}).returncode == -9
    finished = len(list((killed / "pseudo_label_r1").glob("*.labels.npz")))
    recorded = json.loads((killed / "pseudo_label_r1" / "stage.json").read_text())["inputs"]
    assert "batch_size" not in recorded["pseudo_label"]
    record_as_made_before(killed / "pseudo_label_r1",  # when the batch size was an input
                          lambda inputs: inputs["pseudo_label"].update(batch_size=30))
    again = cli(config, killed, "--only", "pseudo_label_r1", "--set", "pseudo_label.batch_size=20")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{4 - finished} of 4 shards to label" in again.stdout + again.stderr


def test_status_counts_shards_from_the_start_of_the_stage(tiny_teacher_run, tmp_path):
    """Before any shard is finished (the first can take minutes on a real pool) status shows 0 of N."""
    config, run = copy_run(tiny_teacher_run, tmp_path)
    dead = cli(config, run, "--only", "pseudo_label_r1", env={env_name("batch"): "1"})
    assert dead.returncode == -9 and not list((run / "pseudo_label_r1").glob("*.labels.npz"))
    os.utime(run / "pseudo_label_r1" / "wall_time.json")  # as if its heartbeat were still beating
    state = RunDir(run).stage_state("pseudo_label_r1")
    assert state.startswith("running (") and state.endswith("; shard 0 of 4)"), state


def test_killing_only_the_main_process_frees_the_run_at_once(tiny_teacher_run, tmp_path):
    """The OOM killer's way: SIGKILL the main process while its loader workers live on a few seconds."""
    config, run = copy_run(tiny_teacher_run, tmp_path)
    with open(tmp_path / "killed.log", "w") as log:  # not a pipe: nothing waits for the orphaned workers
        main_process = subprocess.Popen(cli_args(config, run, "--only", "pseudo_label_r1"), stdout=log, stderr=log,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", env_name("batch"): "10"})
        assert main_process.wait(timeout=600) == -9
    with RunDir(run):  # at once, while the workers may still be exiting
        pass
    again = cli(config, run, "--only", "pseudo_label_r1")
    assert again.returncode == 0, again.stderr
    assert "of 4 shards to label" in again.stdout + again.stderr


def test_two_processes_equal_one(tiny_teacher_run, tmp_path):
    config, one = copy_run(tiny_teacher_run, tmp_path, "one")
    _, two = copy_run(tiny_teacher_run, tmp_path, "two")
    assert cli(config, one, "--only", "pseudo_label_r1").returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    result = cli(config, two, "--only", "pseudo_label_r1", launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((two / "pseudo_label_r1" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["images_this_run"] == 400  # both ranks' images in the rate
    assert_same_sidecars(sidecars(one), sidecars(two))
    progress = json.loads((two / "pseudo_label_r1" / "progress.json").read_text())
    assert progress["unit"] == "shard" and progress["total"] == 4 and progress["saved_step"] >= 2  # rank 0's 2 at least


def test_other_teacher_is_refused(tiny_teacher_run, tmp_path):
    config, run = copy_run(tiny_teacher_run, tmp_path)
    assert cli(config, run, "--only", "pseudo_label_r1", env={env_name("batch"): "5"}).returncode == -9
    # another teacher trained into the run: other weights, saved consistently (meta.json matches them;
    # weights swapped under an old meta.json are refused earlier, see test_bad_input.py)
    from teachers.checkpoint import load_checkpoint, read_meta, save_checkpoint
    checkpoint = run / "teacher" / "checkpoint"
    model, meta = load_checkpoint(checkpoint)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_checkpoint(checkpoint, model, read_meta(checkpoint))
    refused = cli(config, run, "--only", "pseudo_label_r1")
    assert refused.returncode == 2
    assert "teacher_sha256" in refused.stderr and "--from pseudo_label_r1" in refused.stderr


def corrupt_one_png(shard: Path) -> str:
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    victim = members[5][0]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            data = b"not a png" if name == victim else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return victim.split(".")[0]


def test_corrupt_sample_is_skipped_and_counted(tiny_data, tmp_path):
    """A sample that does not decode is skipped and named; a truncated shard's lost images are counted and
    said on the console."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    key = corrupt_one_png(data / "unlabeled" / "unlabeled-000001.tar")
    cut = data / "unlabeled" / "unlabeled-000002.tar"
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: 0\ndata:\n  source: shards\n  path: {data}\n")
    run = tmp_path / "run"
    result = cli(config, run, "--only", "data")
    result = cli(config, run, "--only", "teacher")
    result = cli(config, run, "--only", "pseudo_label_r1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run / "pseudo_label_r1" / "manifest.json").read_text())
    assert manifest["num_skipped"] == 1 and manifest["num_truncated_shards"] == 1
    assert manifest["truncated"][0]["shard"] == "unlabeled-000002.tar"
    unread = json.loads((run / "pseudo_label_r1" / "metrics.json").read_text())["num_unread"]
    assert 0 < unread < 100 and manifest["num_labeled"] == 399 - unread
    assert f"1 skipped, {unread} not read from 1 truncated shard(s)" in result.stdout + result.stderr
    assert manifest["skipped"][0]["key"] == key and manifest["skipped"][0]["shard"] == "unlabeled-000001.tar"
    assert "does not decode" in manifest["skipped"][0]["reason"]
    assert key not in set(sidecars(run)["unlabeled-000001.labels.npz"].keys)


def test_a_shard_with_no_readable_image_is_skipped_through_the_student(tiny_teacher_run, tmp_path):
    """Its sidecar has the classes' width (it was 0 x 1), so the student's in-memory pool loads."""
    config, run = copy_run(tiny_teacher_run, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(Path(config.read_text().split("path: ")[1].strip()), data)
    shard = data / "unlabeled" / "unlabeled-000001.tar"
    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(b"not a png")
            tar.addfile(info, io.BytesIO(b"not a png"))
    config = tmp_path / "broken.yaml"
    config.write_text(f"seed: 0\ndata:\n  source: shards\n  path: {data}\n")
    student = ["--set", "student.rounds=1", "--set", "student.model.arch=test_resnet", "--set",
               "student.model.input_size=16", "--set", "student.train.steps=2", "--set", "student.train.batch_size=16",
               "--set", "select.min_confidence=0.0"]
    result = cli(config, run, *student, "--only", "pseudo_label_r1")  # the teacher is the one already trained
    assert result.returncode == 0, result.stderr[-3000:]
    empty = sidecars(run)["unlabeled-000001.labels.npz"]
    assert len(empty.keys) == 0 and empty.full_logits().shape == (0, 10)
    for stage in ("select_r1", "student_r1"):
        result = cli(config, run, *student, "--only", stage)
        assert result.returncode == 0, result.stderr[-3000:]


def test_calibrate_without_holdout_is_a_clear_error(tiny_teacher_run, tmp_path):
    config, run = copy_run(tiny_teacher_run, tmp_path)
    result = cli(config, run, "--set", "select.calibrate=true")
    assert result.returncode == 2
    assert "data.holdout_per_class" in result.stderr


def test_a_shard_missing_while_labeling_stops_the_stage_and_is_labeled_once_back(tiny_teacher_run, tmp_path):
    """A shard the storage cannot give (moved away, a mount or network down) is not a truncated one: its
    sidecar would hold 0 rows and the rerun would never read it again."""
    config, run = copy_run(tiny_teacher_run, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(Path(config.read_text().split("path: ")[1].strip()), data)
    config = tmp_path / "moved.yaml"
    config.write_text(f"seed: 0\ndata:\n  source: shards\n  path: {data}\n")
    shard = data / "unlabeled" / "unlabeled-000001.tar"
    shard.rename(tmp_path / shard.name)
    failed = cli(config, run, "--only", "pseudo_label_r1", workers=0)  # in order: shard 0 is labeled first
    assert failed.returncode != 0
    assert f"shard {shard} could not be read" in failed.stderr and "not counted as damaged" in failed.stderr
    assert "unlabeled-000001.labels.npz" not in sidecars(run)
    (tmp_path / shard.name).rename(shard)
    damaged = run / "pseudo_label_r1" / "unlabeled-000000.labels.npz"  # a finished sidecar damaged on disk since
    damaged.write_bytes(damaged.read_bytes()[:100])
    refused = cli(config, run, "--only", "pseudo_label_r1")
    assert refused.returncode != 0 and "delete it and rerun to label shard unlabeled-000000.tar" in refused.stderr
    damaged.unlink()
    done = cli(config, run, "--only", "pseudo_label_r1")
    assert done.returncode == 0, done.stderr[-3000:]
    _, whole = copy_run(tiny_teacher_run, tmp_path, "whole")
    assert cli(config, whole, "--only", "pseudo_label_r1").returncode == 0
    assert_same_sidecars(sidecars(run), sidecars(whole))
