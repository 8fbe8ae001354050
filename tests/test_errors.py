"""Bad labeled input fails loudly and names the shard and key (DESIGN.md section 7)."""

import io
import shutil
import tarfile

import pytest

from pipeline.data.imageset import load_labeled_split, open_data
from pipeline.data.shards import ShardError, iter_shard, ReadProblems


def copy_data(tiny_data, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    return out


def rewrite_member(shard, name, payload):
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name == name:
                if payload is None:
                    continue
                data = payload
            members.append((m.name, data))
    with tarfile.open(shard, "w") as tar:
        for n, data in members:
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def first_key(shard):
    return next(iter_shard(shard))["__key__"]


def test_sha_mismatch_names_shard(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    shard = open_data(data).shard_paths("labeled")[0]
    rewrite_member(shard, f"{first_key(shard)}.png", b"garbage")
    with pytest.raises(ShardError, match=f"{shard.name}.*sha256"):
        load_labeled_split(open_data(data), "labeled")


def test_undecodable_labeled_sample_names_shard_and_key(tiny_data, tmp_path):
    from pipeline.data.shards import decode_image
    data = copy_data(tiny_data, tmp_path)
    shard = open_data(data).shard_paths("labeled")[0]
    key = first_key(shard)
    rewrite_member(shard, f"{key}.png", b"garbage")
    sample = next(iter_shard(shard))
    with pytest.raises(ShardError, match=f"{shard.name}, key '{key}': image does not decode"):
        decode_image(sample, shard, "L")


def test_missing_cls_names_shard_and_key(tiny_data, tmp_path):
    from pipeline.data.shards import decode_label
    data = copy_data(tiny_data, tmp_path)
    shard = open_data(data).shard_paths("labeled")[0]
    key = first_key(shard)
    rewrite_member(shard, f"{key}.cls", None)
    sample = next(iter_shard(shard))
    with pytest.raises(ShardError, match=f"key '{key}': missing 'cls'"):
        decode_label(sample, shard, 10)


def test_truncated_shard_strict_and_lenient(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    shard = open_data(data).shard_paths("unlabeled")[0]
    full = [s["__key__"] for s in iter_shard(shard)]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2 + 100])
    with pytest.raises(ShardError, match=f"{shard.name} is truncated or corrupt after key"):
        list(iter_shard(shard, on_error="raise"))
    problems = ReadProblems()
    kept = [s["__key__"] for s in iter_shard(shard, on_error="skip", problems=problems)]
    assert 0 < len(kept) < len(full) and kept == full[: len(kept)]
    assert problems.truncated[0]["shard"] == shard.name
    assert problems.truncated[0]["after_key"] == kept[-1]


def test_image_of_other_mode_is_converted_to_the_data_mode(tmp_path):
    """An RGB or palette image in a grayscale data set decodes to the manifest's mode, not an error."""
    import numpy as np
    from PIL import Image
    from pipeline.data.shards import decode_image
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8), "RGB").save(buffer, format="PNG")
    image = decode_image({"__key__": "k", "png": buffer.getvalue()}, tmp_path / "s.tar", "L")
    assert image.shape == (20, 30, 1) and image.dtype == np.uint8


def test_a_stage_stopped_by_an_error_shows_it_in_status_until_a_rerun_succeeds(tiny_data, tmp_path, capsys):
    """`selftrain status` tells a failed stage (with its error) from an interrupted one; the rerun that
    succeeds clears it."""
    from conftest import TINY_TEACHER, set_args, tiny_config

    from pipeline.cli import main
    from pipeline.stages.status import describe

    data = copy_data(tiny_data, tmp_path)
    config, run = tiny_config(tmp_path, data), tmp_path / "run"
    assert main(["run", str(config), "--run-dir", str(run), "--only", "data"] + set_args(TINY_TEACHER)) == 0
    shard = open_data(data).shard_paths("labeled")[0]
    original = shard.read_bytes()
    rewrite_member(shard, f"{first_key(shard)}.png", b"garbage")
    assert main(["run", str(config), "--run-dir", str(run), "--only", "teacher"] + set_args(TINY_TEACHER)) == 2
    capsys.readouterr()
    state = dict(describe(run))["teacher"]
    assert state.startswith("failed (ShardError: ") and shard.name in state
    assert state.endswith("fix the cause and rerun)")
    shard.write_bytes(original)
    assert main(["run", str(config), "--run-dir", str(run), "--only", "teacher"] + set_args(TINY_TEACHER)) == 0
    assert dict(describe(run))["teacher"] == "done" and not (run / "teacher" / "failed.json").exists()
