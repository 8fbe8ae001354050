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
