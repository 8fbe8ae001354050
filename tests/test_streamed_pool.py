"""`student.pool: streamed`: the selected pool read from the shards, shuffled in a bounded buffer, resumable."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.faults import env_name
from pipeline.core.rundir import RunDir
from pipeline.data import pool_stream
from pipeline.data.imageset import open_data
from pipeline.data.loader import Source
from pipeline.data.pool import LabelForm, load_selected_pool
from pipeline.data.pool_stream import PoolStream, pool_shards
from pipeline.data.pool_stream_loader import PoolPosition, StreamedMixtureSampler
from conftest import TINY_TEACHER, set_args
from test_student import STUDENT, assert_same, cli, weights

# per_class 60 > most classes hold: selection repeats images, so copies are exercised
STREAMED = ["--set", "student.pool=streamed", "--set", "student.shuffle_buffer=50", "--set", "select.per_class=60"]
FORM = LabelForm("soft", 1.0, 0.0)


def data_dir_of(config: Path) -> Path:
    return Path(config.read_text().split("path: ")[1].strip())


@pytest.fixture(scope="module")
def streamed_run(tiny_teacher_run, tmp_path_factory):
    """A full tiny pipeline (data, teacher, pseudo-label, select, student, report) with the streamed pool."""
    config, teacher_run = tiny_teacher_run
    run = tmp_path_factory.mktemp("streamed") / "run"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    result = cli(config, run, *STREAMED)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, run


def open_pool(config: Path, run: Path, data_dir: Path | None = None):
    data_dir = data_dir or data_dir_of(config)
    data = open_data(data_dir)
    return data, pool_shards(data, RunDir(run, data_dir), "pseudo_label_r1", "select_r1")


def plan_repeats(run: Path) -> dict[str, int]:
    repeats = {}
    for path in sorted((run / "select_r1").glob("*.plan.npz")):
        plan = np.load(path)
        repeats.update({str(k): int(r) for k, r in zip(plan["keys"], plan["repeats"]) if r > 0})
    return repeats


def test_full_pipeline_with_the_streamed_pool_completes(streamed_run):
    _, run = streamed_run
    metrics = json.loads((run / "student_r1" / "metrics.json").read_text())
    assert metrics["pool"] == "streamed" and (run / "student_r1" / "DONE").exists()
    assert metrics["num_pseudo_with_copies"] == sum(plan_repeats(run).values())
    assert metrics["steps_per_epoch"] == -(-metrics["num_pseudo_with_copies"] // (16 * 2))
    assert (run / "report" / "report.md").exists()


@pytest.mark.parametrize("buffer", [1, 7, 2000])
def test_every_epoch_holds_each_copy_once(streamed_run, buffer):
    config, run = streamed_run
    data, shards = open_pool(config, run)
    repeats = plan_repeats(run)
    stream = PoolStream(shards, FORM, 0, buffer, data.image_keys)
    per_epoch = sum(repeats.values())
    assert per_epoch == sum(s.copies for s in shards) and max(repeats.values()) > 1  # copies are exercised
    epochs = [[stream.next_item()[0][0] for _ in range(per_epoch)] for _ in range(2)]
    for keys in epochs:
        assert Counter(keys) == Counter(repeats)
    assert epochs[0] != epochs[1]  # a new shard order and buffer draw each epoch
    if buffer > 1:
        assert epochs[0] != sorted(epochs[0], key=list(repeats).index)  # shuffled within shards too


def test_shards_unequal_across_processes_are_warned_about(streamed_run):
    """Each rank streams whole shards at the same share a step: unequal ranks do not cover an epoch exactly."""
    config, run = streamed_run
    data, shards = open_pool(config, run)
    counts = sorted(s.copies for s in shards)
    assert counts[0] != counts[-1] or len(shards) % 3  # 3 processes cannot get equal shares here
    with pytest.warns(UserWarning, match=r"give the 3 processes \[.*\] images in epoch 0"):
        PoolStream(shards, FORM, 0, 50, data.image_keys, rank=0, world=3)


def test_steps_mix_b_labeled_and_r_times_b_streamed(streamed_run):
    config, run = streamed_run
    data, shards = open_pool(config, run)
    stream = PoolStream(shards, FORM, 0, 50, data.image_keys)
    sampler = StreamedMixtureSampler(Source(np.arange(30), 4), stream, 12, total_steps=6, seed=0,
                                     position=PoolPosition())
    for batch in sampler:
        sources = Counter(item[0] for item in batch)
        assert sources == {0: 4, 1: 12}


def test_targets_are_the_sidecars_and_hidden_labels_are_never_read(streamed_run, tmp_path, monkeypatch):
    """The pool's shards without their `cls` members and without the truth file stream the same items."""
    config, run = streamed_run
    data_dir = tmp_path / "data"
    shutil.copytree(data_dir_of(config), data_dir)
    (data_dir / "unlabeled_truth.json").unlink()
    for shard in sorted((data_dir / "unlabeled").glob("*.tar")):
        with tarfile.open(shard) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers() if not m.name.endswith(".cls")]
        with tarfile.open(shard, "w") as dst:
            for member, payload in members:
                dst.addfile(member, io.BytesIO(payload))
    import pipeline.data.shards as shards_module
    for name in ("label_value", "decode_label"):
        monkeypatch.setattr(shards_module, name, lambda *a, **k: pytest.fail("a label was read"))
    data, shards = open_pool(config, run, data_dir)
    stream = PoolStream(shards, FORM, 0, 2000, data.image_keys)
    items = [stream.next_item()[0] for _ in range(sum(s.copies for s in shards))]
    memory = load_selected_pool(data, RunDir(run, data_dir), "pseudo_label_r1", "select_r1", FORM, progress=False)
    expected = dict(zip(memory.keys, memory.targets))
    for key, ext, payload, target in items:
        np.testing.assert_array_equal(target, expected[key])
        assert ext == "png" and payload[:4] == b"\x89PNG"
    assert {key for key, *_ in items} == set(memory.keys)


def test_a_restored_position_continues_the_stream_reading_one_shard(streamed_run, monkeypatch):
    config, run = streamed_run
    data, shards = open_pool(config, run)
    straight = PoolStream(shards, FORM, 3, 40, data.image_keys)
    total = 2 * sum(s.copies for s in shards) + 17  # into the third epoch
    expected = [straight.next_item() for _ in range(total)]
    for cut in (0, 1, 39, 41, 150, sum(s.copies for s in shards), total - 5):
        first = PoolStream(shards, FORM, 3, 40, data.image_keys)
        got = [first.next_item() for _ in range(cut)]
        snapshot = first.snapshot()
        opened = []
        original = pool_stream._ShardReader.__init__

        def counting(self, shard, *args):
            opened.append((shard.name, args[-1]))
            original(self, shard, *args)
        monkeypatch.setattr(pool_stream._ShardReader, "__init__", counting)
        resumed = PoolStream(shards, FORM, 3, 40, data.image_keys)
        resumed.restore(snapshot)
        got.append(resumed.next_item())
        assert len(opened) <= 2 and all(skip == 0 for _, skip in opened[1:])  # the current shard's prefix, at most
        got += [resumed.next_item() for _ in range(total - cut - 1)]
        monkeypatch.undo()
        assert [(k[0], s) for k, s in got] == [(k[0], s) for k, s in expected], cut


@pytest.mark.parametrize("workers", [0, 1])
def test_kill_and_resume_gives_the_same_weights(tiny_teacher_run, streamed_run, tmp_path, workers):
    """Killed after step 3 (saved at 2) and resumed == the uninterrupted fixture run (workers=0): batches
    depend neither on the kill nor on the worker count."""
    config, teacher_run = tiny_teacher_run
    run = tmp_path / "killed"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    args = (*STREAMED, "--set", f"runtime.workers={workers}")
    killed = cli(config, run, *args, env={env_name("step"): "3"})
    assert killed.returncode == -9
    assert not (run / "student_r1" / "DONE").exists()
    result = cli(config, run, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 2" in result.stdout + result.stderr
    assert_same(weights(streamed_run[1], "student_r1"), weights(run, "student_r1"))


def torchrun_cli(config: Path, run: Path, port: int, env: dict | None = None):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run)] + set_args(TINY_TEACHER + STUDENT)
    # with loss_balance each rank keeps its own running loss averages: both must come back on resume
    args += ["--set", "student.loss_balance=true"]
    return subprocess.run(args + list(STREAMED), capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_two_processes_stream_their_own_shards_and_resume_exactly(tiny_teacher_run, tmp_path):
    """Under torchrun with 2 processes each rank streams its own shards; killed after step 3 (state saved
    at 2) and rerun, the weights equal an uninterrupted 2-process run's (each rank's stream position and
    loss averages restored, not rank 0's on both)."""
    config, teacher_run = tiny_teacher_run
    runs = {}
    for name, env in (("whole", None), ("killed", {env_name("step"): "3"})):
        runs[name] = tmp_path / name
        shutil.copytree(teacher_run, runs[name], ignore=shutil.ignore_patterns("lock"))
        result = torchrun_cli(config, runs[name], 29571, env)
        if env:
            assert result.returncode != 0 and not (runs[name] / "student_r1" / "DONE").exists()
            result = torchrun_cli(config, runs[name], 29571)
            assert "resuming from step 2" in result.stdout + result.stderr
        assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((runs["whole"] / "student_r1" / "metrics.json").read_text())
    assert metrics["pool"] == "streamed" and metrics["num_processes"] == 2
    assert_same(weights(runs["whole"], "student_r1"), weights(runs["killed"], "student_r1"))


def test_every_batch_kind_is_pinned_by_the_loaders_pin_thread(monkeypatch):
    """The DataLoader's pin thread calls a batch's own pin_memory() and passes other objects through: the batch
    dataclasses had none, so `pin_memory=True` pinned nothing and each copy to the GPU was synchronous."""
    import torch
    from torch.utils.data._utils.pin_memory import pin_memory

    from pipeline.data.loader import collate_uint8
    from pipeline.data.pool_stream_loader import collate_mixed
    from pipeline.data.shard_stream import ShardBatch

    made: list[int] = []

    def pin(tensor, *args, **kwargs):  # this machine has no GPU to pin for: a marked copy stands in
        copy = tensor.clone()
        made.append(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    image = np.zeros((4, 4, 1), np.uint8)
    batches = [collate_uint8([(image, 0, 3)]), collate_mixed([(image, 1, 5, np.ones(10, np.float32))]),
               ShardBatch(0, ["k"], torch.zeros(1, 1, 4, 4, dtype=torch.uint8))]
    for batch in batches:
        out = pin_memory(batch)
        assert type(out) is type(batch) and id(out.images) in made
    assert id(pin_memory(batches[1]).targets) in made
