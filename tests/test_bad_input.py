"""A user's mistake or a damaged file gives one clear line naming the culprit (exit 2), never a traceback."""

import hashlib
import json
import shutil
from pathlib import Path

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


# run bookkeeping that a refused command may rewrite: the lock (holder pid) and the resolved config
BOOKKEEPING = {"lock", "config.yaml", ".selftrain-run"}


def file_hashes(paths) -> dict[Path, str]:
    """sha256 of every file under the given files and directories."""
    found = {}
    for root in map(Path, paths):
        for path in ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())):
            if path.name not in BOOKKEEPING:
                found[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def error_of(args, capsys, also=()) -> str:
    """Run the CLI expecting a clear error (exit 2, no traceback); every file the command was pointed at
    (any argument that is an existing path, and `also`) must be unchanged afterwards: nothing lost."""
    watched = [a for a in args if not a.startswith("-") and Path(a).exists()] + list(also)
    before = file_hashes(watched)
    assert main(args) == 2
    after = file_hashes(watched)
    assert {p: h for p, h in after.items() if p in before} == before, "a file changed or vanished"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "selftrain: error:" in err  # after any progress bar output
    return err[err.index("selftrain: error:"):]


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
    ("--seed", "-1", "seed (--seed / data.seed) must be at least 0"),  # a numpy traceback before
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
    broken, empty = tmp_path / "broken.png", tmp_path / "empty.png"
    broken.write_bytes(b"not an image")
    empty.write_bytes(b"")  # cv2 raised on it, and every other image's result was lost
    assert main(["predict", str(checkpoint), str(broken), str(empty), str(image), "--json"]) == 2
    captured = capsys.readouterr()
    assert f"{broken}: not a readable image" in captured.err and f"{empty}: not a readable image" in captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]  # one object per image, failures included
    assert [line["image"] for line in lines] == [str(broken), str(empty), str(image)] and len(lines[2]["top"]) == 3
    assert lines[0]["error"].startswith("not a readable image") and "top" not in lines[0]


def test_duplicate_unlabeled_keys_are_skipped_counted_and_named(tiny_teacher_run, tiny_data, tmp_path):
    import io
    import tarfile

    from conftest import TINY_TEACHER, set_args
    from pipeline.core.atomic import sha256_file

    config, teacher_run = tiny_teacher_run
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shards = [data / "unlabeled" / r["name"] for r in manifest["splits"]["unlabeled"]["shards"]]
    with tarfile.open(shards[0]) as tar:
        first = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()][:1]  # one sample (a .png) of shard 0
    with tarfile.open(shards[1]) as tar:
        own = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    again = [(own[0][0], first[0][1])]  # shard 1's first key once more, under another image
    with tarfile.open(shards[1], "w") as tar:  # shard 1: a key of shard 0, its own samples, its first key again
        for name, payload in first + own + again:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    record = manifest["splits"]["unlabeled"]["shards"][1]
    record["sha256"] = sha256_file(shards[1])
    (data / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    cfg = tiny_config(tmp_path, data)
    for stage in ("pseudo_label_r1", "select_r1"):
        assert main(["run", str(cfg), "--run-dir", str(run), "--only", stage, "--set", "student.rounds=0"]
                    + set_args(TINY_TEACHER + ["select.min_confidence=0", "select.per_class=1000"])) == 0  # keep all
    labels = json.loads((run / "pseudo_label_r1" / "manifest.json").read_text())
    reasons = [s["reason"] for s in labels["skipped"]]
    assert reasons == [f"duplicate __key__ in shard {shards[1].name} (the first is kept)"]
    duplicates = json.loads((run / "select_r1" / "metrics.json").read_text())["duplicate_keys"]
    assert duplicates["count"] == 1 and shards[0].name in duplicates["examples"][0]
    # every in-memory reader keeps the image the teacher labeled: the first under each key
    from pipeline.core.rundir import RunDir
    from pipeline.data.imageset import load_unlabeled_split, open_data
    from pipeline.data.pool import LabelForm, load_selected_pool
    from pipeline.data.shards import decode_bytes

    info = open_data(data)
    key = own[0][0].rsplit(".", 1)[0]
    labeled_image = decode_bytes(own[0][1], info.mode)
    assert not np.array_equal(labeled_image, decode_bytes(first[0][1], info.mode))
    pool = load_selected_pool(info, RunDir(run, data), "pseudo_label_r1", "select_r1", LabelForm("soft", 1.0, 0.0),
                              progress=False)
    np.testing.assert_array_equal(pool.images[pool.keys.index(key)], labeled_image)
    unlabeled, problems = load_unlabeled_split(info)
    assert len(unlabeled.keys) == len(set(unlabeled.keys))
    np.testing.assert_array_equal(unlabeled.images[unlabeled.keys.index(key)], labeled_image)
    first_key = first[0][0].rsplit(".", 1)[0]
    assert unlabeled.keys.index(first_key) < len(own)  # the shard-0 image, not its copy in shard 1
    assert sorted(s["key"] for s in problems.skipped) == sorted([first_key, key])


def test_unknown_architecture_is_refused_before_any_stage_records_it(tiny_data, tmp_path, capsys):
    from conftest import TINY_TEACHER, set_args

    config = tiny_config(tmp_path, tiny_data)
    args = ["run", str(config), "--run-dir", str(tmp_path / "run"), "--set", "student.rounds=0"]
    err = error_of(args + set_args(TINY_TEACHER + ["teacher.model.arch=resnet19"]), capsys, also=[tiny_data])
    assert "unknown timm architecture 'resnet19'; did you mean resnet18" in err
    assert not list(tmp_path.glob("run/*/stage.json"))  # nothing recorded: the corrected rerun just runs
    err = error_of(args + set_args(TINY_TEACHER + ["teacher.model.init=/nonexistent/ckpt"]), capsys)
    assert "teacher.model.init: /nonexistent/ckpt does not exist (a checkpoint directory, a weights file" in err


def test_an_import_without_unlabeled_pool_is_refused_before_training(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["unlabeled"] = {"count": 0, "per_class": None, "shards": []}
    (data / "manifest.json").write_text(json.dumps(manifest))
    err = error_of(["run", str(tiny_config(tmp_path, data)), "--run-dir", str(tmp_path / "run")], capsys,
                   also=[data])
    assert "the unlabeled pool is empty" in err and not (tmp_path / "run" / "teacher").exists()


def test_disk_full_during_a_write_leaves_no_partial_file_and_names_enospc(tmp_path, monkeypatch):
    import errno
    import os

    from pipeline.core.atomic import WriteFailed, write_bytes

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteFailed, match=rf"cannot write {tmp_path / 'x.bin'}: ENOSPC"):
        write_bytes(tmp_path / "x.bin", b"payload")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_the_export_embeds_its_metadata_names_enospc(tmp_path, monkeypatch):
    """embed_meta wrote with onnx.save: a full disk gave an OSError traceback and left NAME.onnx.tmp."""
    import errno
    import json
    import os

    import onnx
    from onnx import TensorProto, helper

    from pipeline.core.atomic import WriteFailed
    from pipeline.stages.export import embed_meta

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "export" / "m.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph), str(path))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "meta.json").write_text(json.dumps({"arch": "x"}))
    embed_meta(path, tmp_path / "checkpoint")
    assert onnx.load(str(path)).metadata_props[0].value == '{"arch": "x"}'
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(WriteFailed, match=rf"cannot write {path}: ENOSPC"):
        embed_meta(path, tmp_path / "checkpoint")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_disk_full_while_saving_the_training_state_names_enospc(tmp_path, monkeypatch, writer):
    """accelerate writes the model through safetensors, whose writer raises its own error, and the optimizer
    through torch.save, which raises RuntimeError ("unexpected pos"): neither is an OSError."""
    from types import SimpleNamespace

    from safetensors import SafetensorError

    import pipeline.engine.trainer as trainer
    from pipeline.core.atomic import WriteFailed

    def full(directory):
        Path(directory).mkdir()
        (Path(directory) / "model.safetensors").write_bytes(b"part")
        if writer == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 574")

    monkeypatch.setattr(trainer, "_disk_full", lambda directory: writer == "torch.save")
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=full)
    (tmp_path / "state").mkdir()
    with pytest.raises(WriteFailed, match=r"cannot save the training state to .*state.tmp: ENOSPC.*is intact"):
        trainer._save_state(accelerator, tmp_path / "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # nothing partial left
    monkeypatch.setattr(trainer, "_disk_full", lambda directory: False)
    if writer == "torch.save":  # another failure is itself, and still leaves nothing partial
        with pytest.raises(RuntimeError, match="unexpected pos"):
            trainer._save_state(accelerator, tmp_path / "state")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_the_stage_clock_keeps_the_error_in_flight_when_its_own_write_fails(tmp_path, monkeypatch):
    """A full disk stopped training; the clock's last write failed too and replaced the real error."""
    from pipeline.core import wallclock
    from pipeline.core.atomic import WriteFailed

    clock = wallclock.StageClock(tmp_path / "wall_time.json")
    with pytest.raises(RuntimeError, match="the real error"):
        with clock:
            monkeypatch.setattr(wallclock, "write_json", lambda *a: (_ for _ in ()).throw(WriteFailed("ENOSPC")))
            raise RuntimeError("the real error")


def test_import_on_a_full_disk_fails_cleanly(tiny_fashion_dir, tmp_path, capsys):
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        err = error_of(["data", "fashion-mnist", "--out", str(small / "fm"), "--source", str(tiny_fashion_dir),
                        "--labels-per-class", "20", "--shard-size", "100"], capsys)
        assert "ENOSPC" in err and str(small / "fm") in err
        assert not list(small.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(small)])


def test_a_sidecar_from_another_teacher_is_refused_by_select(tiny_teacher_run, tmp_path, capsys):
    from conftest import TINY_TEACHER, set_args
    from teachers.sidecar import read_sidecar, write_sidecar

    config, teacher_run = tiny_teacher_run
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("lock"))
    args = ["run", str(config), "--run-dir", str(run), "--set", "student.rounds=0"] + set_args(TINY_TEACHER)
    assert main(args + ["--only", "pseudo_label_r1"]) == 0
    capsys.readouterr()
    victim = sorted((run / "pseudo_label_r1").glob("*.labels.npz"))[1]
    original = read_sidecar(victim)
    write_sidecar(victim, list(original.keys), original.full_logits(),
                  {**original.meta, "teacher_sha256": "f" * 64})  # what another teacher's sidecar would say
    before = {p.name: p.read_bytes() for p in run.glob("pseudo_label_r1/*")}
    err = error_of(args + ["--only", "select_r1"], capsys, also=[teacher_run])
    assert f"{victim}: not the sidecar" in err and "teacher_sha256 ffffffffffff" in err
    assert {p.name: p.read_bytes() for p in run.glob("pseudo_label_r1/*")} == before  # nothing finished changed
    assert not (run / "select_r1" / "DONE").exists()


def test_16_bit_png_is_scaled_not_saturated_and_alpha_is_composited_on_black(tmp_path):
    import io

    from pipeline.data.shards import decode_image

    gray16 = np.full((4, 4), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    buffer = io.BytesIO()
    Image.fromarray(gray16).save(buffer, format="PNG")
    decoded = decode_image({"__key__": "k", "png": buffer.getvalue()}, tmp_path / "s.tar", "L")
    assert decoded.shape == (4, 4, 1) and (decoded == 128).all()

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 255            # hidden white ...
    rgba[0, 0] = (200, 100, 50, 255)  # one opaque pixel
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    decoded = decode_image({"__key__": "k", "png": buffer.getvalue()}, tmp_path / "s.tar", "RGB")
    assert (decoded[0, 0] == (200, 100, 50)).all()
    assert (decoded.reshape(-1, 3)[1:] == 0).all()  # ... behind full transparency stays hidden


def test_a_folder_import_counts_and_names_the_images_it_converts(tmp_path, capsys):
    from pipeline.data.importer import import_folder

    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "src" / c / f"{i}.png")
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "src" / "a" / "wide.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(tmp_path / "src" / "b" / "clear.png")
    keyed = np.full((8, 8), 30, np.uint8)
    keyed[2:5] = 220  # a grey PNG whose colour 220 is marked transparent (tRNS): composited, was not counted
    Image.fromarray(keyed).save(tmp_path / "src" / "a" / "keyed.png", transparency=220)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated by viewers
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / "src" / "b" / "phone.jpg", exif=exif)
    manifest = import_folder(tmp_path / "src", tmp_path / "out", per_class=2, shard_size=100, progress=False)
    assert manifest["conversions"]["16-bit scaled"] == {"count": 1, "examples": [str(tmp_path / "src/a/wide.png")]}
    assert manifest["conversions"]["alpha composited"]["count"] == 2
    assert str(tmp_path / "src/a/keyed.png") in manifest["conversions"]["alpha composited"]["examples"]
    assert manifest["conversions"]["alpha_background"] == [0, 0, 0]
    out = capsys.readouterr().out
    assert "1 image(s) 16-bit scaled to 8 bits" in out and "2 image(s) alpha composited on black" in out
    assert manifest["conversions"]["EXIF orientation not applied"]["examples"] == [str(tmp_path / "src/b/phone.jpg")]
    assert "1 image(s) EXIF orientation not applied (used as stored" in out


@pytest.mark.parametrize("override,message", [
    ("teacher.train.epocs=3", "unknown config key 'teacher.train.epocs'. Did you mean 'teacher.train.epochs'?"),
    ("teacher.train.epochs=ten", "teacher.train.epochs: expected an integer, got 'ten'"),
    ("teacher.train.lr=-1", "teacher.train.lr: -1.0 is out of range; it must be > 0"),
    ("teacher.train.policy=s7", "teacher.train.policy: "),
    ("distill.students=[{arh: mobilenetv3_small_100}]", "unknown config key 'distill.students[0].arh'"),
    ("distill.mode=online-ish", "distill.mode: 'online-ish' is not one of 'online', 'offline'"),
    ("seed", "--set 'seed': expected KEY=VALUE"),
])
def test_config_mistakes_are_named_before_anything_runs(tiny_data, tmp_path, capsys, override, message):
    err = error_of(["run", str(tiny_config(tmp_path, tiny_data)), "--run-dir", str(tmp_path / "run"),
                    "--set", override], capsys)
    assert message in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,message", [("- a\n- b\n", "the top level must be a mapping"),
                                          ("a: [1, 2\n", "not valid YAML")])
def test_config_files_that_are_not_a_config_are_named(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    assert message in error_of(["run", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")], capsys)


@pytest.mark.parametrize("flags,message", [(["--only", "techer"], "--only 'techer': unknown stage"),
                                           (["--only", "teacher", "--from", "teacher"], "either --only or --from")])
def test_stage_selection_mistakes_are_named(tiny_data, tmp_path, capsys, flags, message):
    assert message in error_of(["run", str(tiny_config(tmp_path, tiny_data)), "--run-dir", str(tmp_path / "r")]
                               + flags, capsys)


def test_truncated_weights_are_named(checkpoint, image, capsys):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = error_of(["predict", str(checkpoint), str(image)], capsys)
    assert "model.safetensors" in err


@pytest.mark.parametrize("args,message", [(["--top-k", "0"], "--top-k 0: must be at least 1"),
                                          (["--threads", "-1"], "--threads -1: must be at least 1"),
                                          (["--threads", "0"], "--threads 0: must be at least 1"),
                                          ([], "no image files in")])
def test_predict_mistakes_are_named(checkpoint, tmp_path, capsys, args, message):
    empty = tmp_path / "no_images"
    empty.mkdir()
    assert message in error_of(["predict", str(checkpoint), str(empty)] + args, capsys)


def test_predict_refuses_a_simclr_backbone_whose_classifier_was_never_trained(checkpoint, image, capsys):
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["lineage"] = {**meta.get("lineage", {}), "method": "simclr"}  # as stage ssl_pretrain writes it
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    assert "is a SimCLR backbone (stage ssl_pretrain): its classifier was never trained" in error_of(
        ["predict", str(checkpoint), str(image)], capsys)


def test_predict_on_something_that_is_no_model_is_named(tmp_path, image, capsys):
    assert "not a checkpoint directory (with meta.json) or an .onnx file" in error_of(
        ["predict", str(tmp_path), str(image)], capsys)


def test_a_folder_with_one_class_is_refused(tmp_path, capsys):
    (tmp_path / "src" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "src" / "only" / "a.png")
    assert "need one sub-folder per class (at least 2)" in error_of(
        ["data", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "out")], capsys)


def test_init_weights_replaced_under_the_same_name_are_a_changed_input(tiny_data, tmp_path, capsys):
    import torch

    from conftest import TINY_TEACHER, record_as_made_before, set_args
    from teachers.models import create_model

    weights = tmp_path / "start.pt"
    torch.manual_seed(0)
    torch.save(create_model("test_resnet", 10, 1).state_dict(), weights)
    run = tmp_path / "run"
    args = ["run", str(tiny_config(tmp_path, tiny_data)), "--run-dir", str(run), "--only", "teacher",
            *set_args(TINY_TEACHER + ["teacher.train.epochs=1", f"teacher.model.init={weights}"])]
    assert main([*args[:4], "--only", "data"]) == 0 and main(args) == 0
    assert main(args) == 0 and "[teacher] done already" in capsys.readouterr().out
    torch.manual_seed(1)
    torch.save(create_model("test_resnet", 10, 1).state_dict(), weights)  # other weights, same file name
    assert "different inputs (init_sha256:" in error_of(args, capsys, also=[run / "teacher"])
    record_as_made_before(run / "teacher", lambda inputs: inputs.pop("init_sha256"))  # before the key existed
    assert main(args) == 0 and "[teacher] done already" in capsys.readouterr().out


def test_an_init_inside_the_run_directory_is_refused_before_from_deletes_it(tiny_teacher_run, tmp_path, capsys):
    """`--from teacher --set teacher.model.init=RUN/teacher/checkpoint` (continue from my model) forgot the
    stage, deleting the checkpoint it was about to start from."""
    from conftest import TINY_TEACHER, set_args
    config, made = tiny_teacher_run
    run = tmp_path / "run"
    shutil.copytree(made, run, ignore=shutil.ignore_patterns("lock"))
    args = ["run", str(config), "--run-dir", str(run), "--from", "teacher",
            *set_args(TINY_TEACHER + [f"teacher.model.init={run / 'teacher' / 'checkpoint'}"])]
    err = error_of(args, capsys, also=[run / "teacher"])
    assert "teacher.model.init: " in err and "is inside this run directory" in err and "copy it out" in err


@pytest.mark.parametrize("case", ["other family", "weights swapped"])
def test_an_init_checkpoint_that_cannot_start_the_model_is_refused_before_the_first_stage(tiny_data, checkpoint,
                                                                                          tmp_path, case, capsys):
    """Found at student_r1 before, after the teacher, pseudo-labels and selection had run."""
    from conftest import TINY_TEACHER, set_args
    overrides = TINY_TEACHER + ["student.rounds=1", f"student.model.init={checkpoint}",
                                "student.model.arch=test_resnet", "student.model.input_size=16"]
    if case == "other family":
        overrides.append("student.model.arch=mobilenetv3_small_100")
        expected = (f'student.model.init "{checkpoint}" (mobilenetv3_small_100): cannot grow \'test_resnet\' into '
                    "this model")
    else:
        weights = next(p for p in checkpoint.iterdir() if p.name != "meta.json")
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        expected = f"student.model.init: {checkpoint}"
    run = tmp_path / "run"
    assert expected in error_of(["run", str(tiny_config(tmp_path, tiny_data)), "--run-dir", str(run),
                                 *set_args(overrides)], capsys)
    assert not (run / "teacher").exists()


def test_a_training_stage_resumed_in_another_precision_is_refused(tiny_teacher_run, tmp_path, capsys):
    """An explicit bf16 changes results on CPU too: a bf16 teacher resumed in fp32 mixed the two. A finished
    stage is read as it was made (a report or the next round on a machine of another kind)."""
    from conftest import TINY_TEACHER, record_as_made_before, set_args
    config, made = tiny_teacher_run
    run = tmp_path / "run"
    shutil.copytree(made, run, ignore=shutil.ignore_patterns("lock"))
    args = ["run", str(config), "--run-dir", str(run), "--only", "teacher", *set_args(TINY_TEACHER)]
    bf16 = args + ["--set", "runtime.mixed_precision=bf16"]
    assert main(bf16) == 0 and "[teacher] done already" in capsys.readouterr().out
    (run / "teacher" / "DONE").unlink()  # interrupted: what is left must be resumed in its own precision
    assert "different inputs (mixed_precision: 'no' -> 'bf16')" in error_of(bf16, capsys, also=[run / "teacher"])
    record_as_made_before(run / "teacher", lambda inputs: inputs.pop("mixed_precision"))  # before the key existed
    assert main(args) == 0 and (run / "teacher" / "DONE").exists()  # such a record is not compared


def test_a_data_stage_that_failed_before_writing_anything_keeps_no_record(tmp_path, capsys):
    """A folder without class folders (a wrong data.path) failed at the import and kept its stage.json: the fixed
    path was then refused as other inputs, with advice to rerun with --from data."""
    empty, images = tmp_path / "empty", tmp_path / "images"
    empty.mkdir()
    for name in ("a", "b"):
        (images / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(images / name / f"{i}.png")
    config = tmp_path / "c.yaml"
    config.write_text("data: {source: folder, labels_per_class: 2, test_fraction: 0.3}\n")
    args = ["run", str(config), "--run-dir", str(tmp_path / "run"), "--only", "data"]
    assert "class" in error_of(args + ["--set", f"data.path={empty}"], capsys)
    assert main(args + ["--set", f"data.path={images}"]) == 0


def test_fp16_without_a_gpu_is_refused(tiny_data, tmp_path, capsys):
    """accelerate trains in fp32 on the CPU when asked for fp16, and the run recorded fp16."""
    args = ["run", str(tiny_config(tmp_path, tiny_data)), "--run-dir", str(tmp_path / "run"),
            "--set", "runtime.mixed_precision=fp16"]
    assert "runtime.mixed_precision is fp16, which needs a GPU" in error_of(args, capsys)
