"""`distill.pool: streamed`: the distill stage reads the unlabeled pool from the shards as it trains."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.rundir import RunDir
from pipeline.data.imageset import open_data
from pipeline.data.loader import Batch
from pipeline.data.pool import PoolError
from pipeline.data.pool_stream import LOGITS, PoolShard, PoolStream, distill_shards
from pipeline.data.pool_stream_loader import MixedBatch
from pipeline.data.shards import iter_shard
from pipeline.stages.distill import stored_logits
from teachers.sidecar import read_sidecar
from test_distill import STAGE, cli, copy_run, kill_resume_and_compare
from test_streamed_pool import data_dir_of

STREAMED = ["--set", "distill.pool=streamed", "--set", "distill.shuffle_buffer=50",
            "--set", "distill.export.repeats=3", "--set", "distill.export.eval_images=64",
            "--set", "distill.export.calibration_images=32"]


def pool_keys(data) -> list[str]:
    return [str(s["__key__"]) for path in data.shard_paths("unlabeled") for s in iter_shard(path)]


def test_streamed_distill_resumes_after_sigkill_to_the_same_weights(tiny_teacher_run, tmp_path):
    config, straight = copy_run(tiny_teacher_run, tmp_path, "straight")
    _, killed = copy_run(tiny_teacher_run, tmp_path, "killed")
    result = cli(config, straight, *STREAMED)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((straight / STAGE / "metrics.json").read_text())
    assert metrics["pool"] == "streamed" and metrics["num_unlabeled"] == 400 and metrics["steps_per_epoch"] == 17
    kill_resume_and_compare(config, straight, killed, *STREAMED)


def test_online_stream_yields_every_unlabeled_image_once_per_epoch_without_targets(tiny_teacher_run):
    config, run = tiny_teacher_run
    data = open_data(data_dir_of(config))
    shards = distill_shards(data, RunDir(run, data_dir_of(config)), None)
    keys = pool_keys(data)
    assert sum(s.copies for s in shards) == len(keys) == 400
    stream = PoolStream(shards, LOGITS, 0, 7, data.image_keys)
    epochs = [[stream.next_item()[0] for _ in range(len(keys))] for _ in range(2)]
    for items in epochs:
        assert Counter(item[0] for item in items) == Counter(keys) and all(item[3] is None for item in items)
    assert [i[0] for i in epochs[0]] != [i[0] for i in epochs[1]]


def test_offline_streamed_distill_reads_the_teachers_logits_from_the_sidecars(tiny_teacher_run, tmp_path):
    config, run = copy_run(tiny_teacher_run, tmp_path, "offline")
    result = cli(config, run, *STREAMED, "--set", "distill.mode=offline")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / STAGE / "metrics.json").read_text())
    assert metrics["mode"] == "offline" and metrics["pool"] == "streamed"
    data = open_data(data_dir_of(config))
    shards = distill_shards(data, RunDir(run, data_dir_of(config)), "pseudo_label_r1")
    stored = {}
    for shard in shards:
        sidecar = read_sidecar(shard.sidecar)
        stored.update({str(k): row for k, row in zip(sidecar.keys, sidecar.full_logits())})
    stream = PoolStream(shards, LOGITS, 0, 50, data.image_keys)
    for _ in range(400):
        (key, _, _, target), _ = stream.next_item()
        np.testing.assert_array_equal(target, stored[key].astype(np.float32))


def test_stored_logits_take_labeled_rows_from_the_table_and_pool_rows_from_the_batch():
    table = torch.arange(3 * 2, dtype=torch.float32).view(3, 2)  # 3 labeled images
    pool_rows = torch.tensor([[10.0, 11.0], [20.0, 21.0]])
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    source, index = torch.tensor([0, 1, 0, 1]), torch.tensor([2, 1, 0, 0])
    streamed = MixedBatch(images, source, index, pool_rows)
    found = stored_logits(table, 3, streamed, source, index)
    torch.testing.assert_close(found, torch.stack([table[2], pool_rows[1], table[0], pool_rows[0]]))
    memory_table = torch.cat([table, pool_rows])  # memory pool: pool rows follow the labeled ones
    found = stored_logits(memory_table, 3, Batch(images, source, index), source, index)
    torch.testing.assert_close(found, torch.stack([table[2], pool_rows[1], table[0], pool_rows[0]]))


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("L", (4, 4), 7).save(out, format="PNG")
    return out.getvalue()


def test_a_sample_without_an_image_is_skipped_and_counted(tmp_path):
    write_tar(tmp_path / "s.tar", {"a.png": png_bytes(), "b.txt": b"no image", "c.png": png_bytes()})
    stream = PoolStream([PoolShard("s.tar", tmp_path / "s.tar", None, None, 3, 3)], LOGITS, 0, 1, ("png",))
    keys = sorted(stream.next_item()[0][0] for _ in range(2))
    assert keys == ["a", "c"] and stream.skipped == 1


def test_shards_without_a_readable_image_are_refused_not_looped_over(tmp_path):
    write_tar(tmp_path / "s.tar", {"b.txt": b"no image"})
    stream = PoolStream([PoolShard("s.tar", tmp_path / "s.tar", None, None, 1, 1)], LOGITS, 0, 4, ("png",))
    with pytest.raises(PoolError, match="no readable image"):
        stream.next_item()
