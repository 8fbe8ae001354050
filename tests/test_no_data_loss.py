"""The tool removes only files it wrote itself: imports, run directories and --from."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.importer import import_fashion_mnist
from pipeline.core.owned import JOURNAL, ForeignFilesError
from pipeline.core.rundir import RunDir, RunDirError


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def image_folder(root, per_class=12):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_folder_import_into_the_users_dataset_is_refused_and_deletes_nothing(tmp_path, capsys):
    ds = tmp_path / "ds"
    image_folder(ds)
    before = tree_hashes(ds)
    code = main(["data", "folder", str(ds / "train"), "--out", str(ds), "--labels-per-class", "4",
                 "--test-fraction", "0.25"])
    err = capsys.readouterr().err
    assert code == 2
    assert "did not write" in err and "test/cat/0.png" in err and "nothing was changed" in err
    assert tree_hashes(ds) == before


def test_interrupted_import_is_redone_removing_only_its_own_files(tiny_fashion_dir, tmp_path):
    out = tmp_path / "out"
    first = import_fashion_mnist(out, str(tiny_fashion_dir), per_class=10, shard_size=100, progress=False)
    (out / "manifest.json").unlink()  # as if killed before the manifest was written
    (out / "labeled" / "labeled-000000.tar.tmp").write_bytes(b"partial")
    again = import_fashion_mnist(out, str(tiny_fashion_dir), per_class=10, shard_size=100, progress=False)
    assert again["splits"] == first["splits"]
    assert not (out / "labeled" / "labeled-000000.tar.tmp").exists()


def test_leftovers_beside_a_foreign_file_are_not_removed(tiny_fashion_dir, tmp_path):
    out = tmp_path / "out"
    import_fashion_mnist(out, str(tiny_fashion_dir), per_class=10, shard_size=100, progress=False)
    (out / "manifest.json").unlink()
    (out / "test" / "notes.txt").write_text("mine")
    before = tree_hashes(out)
    with pytest.raises(ForeignFilesError, match=r"test/notes.txt"):
        import_fashion_mnist(out, str(tiny_fashion_dir), per_class=10, shard_size=100, progress=False)
    assert tree_hashes(out) == before and (out / JOURNAL).exists()


def test_a_run_dir_that_is_someone_elses_folder_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "config.yaml").write_text("mine: true\n")
    with pytest.raises(RunDirError, match=r"did not write \(config.yaml\)"):
        RunDir(tmp_path / "photos").acquire()
    assert (tmp_path / "photos" / "config.yaml").read_text() == "mine: true\n"
    with RunDir(tmp_path / "fresh"):  # new and empty directories are fine
        pass
    with RunDir(tmp_path / "fresh"):  # and so is our own, again
        pass


def test_from_refuses_to_remove_a_stage_directory_holding_user_files(tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin_stage("teacher", {"fingerprint": "a", "inputs": {}})
    (run.checkpoint_dir("teacher")).mkdir()
    (run.checkpoint_dir("teacher") / "model.safetensors").write_bytes(b"w")
    (run.state_dir("teacher") / "sub").mkdir(parents=True)
    (run.state_dir("teacher") / "sub" / "optimizer.bin").write_bytes(b"o")
    (run.stage_dir("teacher") / "my_notes.md").write_text("keep me")
    with pytest.raises(RunDirError, match="my_notes.md.*nothing was removed"):
        run.reset_stage("teacher")
    assert (run.stage_dir("teacher") / "my_notes.md").exists()
    (run.stage_dir("teacher") / "my_notes.md").unlink()
    run.reset_stage("teacher")
    assert not run.stage_dir("teacher").exists()


def test_from_data_removes_the_journaled_import(tiny_fashion_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    run.begin_stage("data", {"fingerprint": "a", "inputs": {}})
    import_fashion_mnist(run.data_dir, str(tiny_fashion_dir), per_class=10, shard_size=100, progress=False)
    run.mark_done("data")
    run.reset_stage("data")
    assert not run.data_dir.exists()


def test_from_refuses_a_missing_source_or_a_damaged_teacher_before_forgetting_any_stage(tmp_path, capsys):
    """`--from data` with the image folder gone (or a relative data.path read from another directory), and
    `--from` with a truncated distill.ensemble member: refused before a stage is forgotten, the run unchanged."""
    from conftest import TINY_TEACHER, set_args

    from teachers.checkpoint import CheckpointMeta, save_checkpoint
    from teachers.models import create_model

    image_folder(tmp_path / "ds", per_class=24)
    config = tmp_path / "folder.yaml"
    config.write_text(f"data:\n  source: folder\n  path: {tmp_path / 'ds' / 'train'}\n  labels_per_class: 8\n"
                      "  shard_size: 100\n")
    run = tmp_path / "run"
    assert main(["run", str(config), "--run-dir", str(run), "--only", "data"] + set_args(TINY_TEACHER)) == 0
    assert main(["run", str(config), "--run-dir", str(run), "--only", "teacher"] + set_args(TINY_TEACHER)) == 0
    before = tree_hashes(run)
    capsys.readouterr()

    missing = ["--set", "data.path=moved/train"]
    assert main(["run", str(config), "--run-dir", str(run), "--from", "data"] + set_args(TINY_TEACHER) + missing) == 2
    err = capsys.readouterr().err
    assert "data.path: image folder moved/train does not exist" in err and "relative to the working directory" in err
    assert tree_hashes(run) == before

    member = tmp_path / "member"
    save_checkpoint(member, create_model("test_resnet", 2, 1), CheckpointMeta(
        arch="test_resnet", num_classes=2, in_chans=1, input_size=16, mean=(0.5,), std=(0.5,),
        class_names=("cat", "dog"), config_hash="x"))
    weights = member / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated after it was written
    for key, value in (("distill.ensemble", f"[{member}]"), ("distill.teacher", str(member))):
        damaged = ["--set", "distill.students=[{arch: test_resnet, input_size: 16}]", "--set", f"{key}={value}"]
        assert main(["run", str(config), "--run-dir", str(run), "--from", "teacher"] + set_args(TINY_TEACHER)
                    + damaged) == 2
        err = capsys.readouterr().err
        assert f"{key}{'[0]' if key == 'distill.ensemble' else ''}: {weights}" in err and "damaged" in err
        assert tree_hashes(run) == before
