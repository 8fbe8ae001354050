"""A user's mistake or a damaged file gives one clear line naming the culprit (exit 2), never a traceback."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from pipeline.cli import main


@pytest.fixture
def checkpoint(tiny_teacher_run, tmp_path):
    _, run = tiny_teacher_run
    target = tmp_path / "ckpt"
    shutil.copytree(run / "teacher" / "checkpoint", target)
    return target


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(path)
    return path


def error_of(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("selftrain: error:")
    return err


def test_meta_json_that_is_not_json_is_named(checkpoint, image, capsys):
    (checkpoint / "meta.json").write_text("{not json")
    err = error_of(["predict", str(checkpoint), str(image)], capsys)
    assert f"{checkpoint / 'meta.json'}: not valid JSON" in err


def test_manifest_that_is_not_json_is_named(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "manifest.json").write_text("[1, 2")
    err = error_of(["run", str(tiny_config(tmp_path, data)), "--run-dir", str(tmp_path / "run"), "--only", "data"],
                   capsys)
    assert f"{data / 'manifest.json'}: not valid JSON" in err


def test_meta_naming_another_architecture_is_refused(checkpoint, image, capsys):
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["arch"] = "resnet18"
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    err = error_of(["predict", str(checkpoint), str(image)], capsys)
    assert "model.safetensors: weights do not fit the model" in err and "meta.json names another" in err


def test_meta_naming_another_channel_count_is_refused(checkpoint, image, capsys):
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["in_chans"] = 3
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    assert "weights do not fit the model" in error_of(["predict", str(checkpoint), str(image)], capsys)


def test_weights_swapped_under_meta_are_refused(tiny_teacher_run, checkpoint):
    from teachers.checkpoint import CheckpointError, checkpoint_hash

    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (checkpoint / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="differs from the .* recorded in .*meta.json"):
        checkpoint_hash(checkpoint)


def test_empty_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("\n# nothing\n")
    err = error_of(["run", str(tmp_path / "empty.yaml"), "--run-dir", str(tmp_path / "run")], capsys)
    assert "empty.yaml: the config file is empty" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--max-unlabeled", "0", "max_unlabeled (--max-unlabeled / data.max_unlabeled) must be at least 1"),
    ("--max-unlabeled", "-5", "max_unlabeled (--max-unlabeled / data.max_unlabeled) must be at least 1"),
    ("--labels-per-class", "0", "labels_per_class (--labels-per-class / data.labels_per_class) must be at least 1"),
])
def test_bad_import_numbers_are_named(tiny_fashion_dir, tmp_path, capsys, flag, value, message):
    err = error_of(["data", "fashion-mnist", "--out", str(tmp_path / "out"), "--source", str(tiny_fashion_dir),
                    flag, value], capsys)
    assert message in err and not (tmp_path / "out").exists()


def test_test_fraction_out_of_range_names_test_fraction(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "src" / name / f"{i}.png")
    err = error_of(["data", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--labels-per-class",
                    "2", "--test-fraction", "1.5"], capsys)
    assert "test_fraction (--test-fraction / data.test_fraction) must be between 0 and 1" in err


def test_unreadable_image_is_named_and_the_others_are_predicted(checkpoint, image, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["predict", str(checkpoint), str(broken), str(image), "--json"]) == 2
    captured = capsys.readouterr()
    assert f"{broken}: not a readable image" in captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["image"] for line in lines] == [str(image)] and len(lines[0]["top"]) == 3
