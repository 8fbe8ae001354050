import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.importer import ClassFilter, import_fashion_mnist, import_folder
from pipeline.data.imageset import load_labeled_split, open_data
from pipeline.data.shards import iter_shard
from pipeline.data.sources.fashion_mnist import DataSourceError


def keys_of(data_dir, split):
    info = open_data(data_dir)
    return [s["__key__"] for p in info.shard_paths(split) for s in iter_shard(p)]


def test_import_is_deterministic_and_splits_do_not_overlap(tiny_fashion_dir, tmp_path):
    a = import_fashion_mnist(tmp_path / "a", str(tiny_fashion_dir), per_class=20, holdout_per_class=5,
                             seed=3, shard_size=64, progress=False)
    b = import_fashion_mnist(tmp_path / "b", str(tiny_fashion_dir), per_class=20, holdout_per_class=5,
                             seed=3, shard_size=64, progress=False)
    c = import_fashion_mnist(tmp_path / "c", str(tiny_fashion_dir), per_class=20, holdout_per_class=5,
                             seed=4, shard_size=64, progress=False)
    assert a["splits"] == b["splits"]  # same shards byte for byte (sha256 per shard)
    assert a["splits"]["labeled"]["shards"] != c["splits"]["labeled"]["shards"]
    labeled, holdout, unlabeled = (set(keys_of(tmp_path / "a", s)) for s in ("labeled", "holdout", "unlabeled"))
    assert len(labeled) == 150 and len(holdout) == 50 and len(unlabeled) == 400
    assert not labeled & holdout and not labeled & unlabeled and not holdout & unlabeled
    assert a["splits"]["labeled"]["per_class"] == [15] * 10
    assert a["splits"]["test"]["count"] == 200
    truth = json.loads((tmp_path / "a" / "unlabeled_truth.json").read_text())
    assert set(truth) == unlabeled


def test_unlabeled_shards_carry_no_labels(tiny_data):
    info = open_data(tiny_data)
    for path in info.shard_paths("unlabeled"):
        for sample in iter_shard(path):
            assert set(sample) == {"__key__", "png"}


def test_import_refuses_other_params_in_same_dir(tiny_fashion_dir, tmp_path):
    import_fashion_mnist(tmp_path / "d", str(tiny_fashion_dir), per_class=10, progress=False)
    with pytest.raises(DataSourceError, match="labels_per_class: 10 -> 12"):
        import_fashion_mnist(tmp_path / "d", str(tiny_fashion_dir), per_class=12, progress=False)


def test_missing_source_names_files_and_fix(tmp_path):
    with pytest.raises(DataSourceError, match="train-images-idx3-ubyte.gz"):
        import_fashion_mnist(tmp_path / "x", str(tmp_path), progress=False)


def test_truncated_idx_is_named(tiny_fashion_dir, tmp_path):
    import gzip
    import shutil
    src = tmp_path / "raw"
    shutil.copytree(tiny_fashion_dir, src)
    raw = gzip.open(src / "train-images-idx3-ubyte.gz").read()
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(raw[:-100])
    with pytest.raises(DataSourceError, match="train-images-idx3-ubyte.gz: truncated"):
        import_fashion_mnist(tmp_path / "y", str(src), progress=False)


def make_folder(root, sizes=((20, 24), (33, 17)), classes=("cat", "dog", "eel")):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(12):
            h, w = sizes[i % len(sizes)]
            if i % 3 == 0:
                Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), "L").save(root / name / f"img.{i}.png")
            else:
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").save(
                    root / name / f"{i}.jpg", quality=90)


def test_folder_import(tmp_path):
    make_folder(tmp_path / "src")
    manifest = import_folder(tmp_path / "src", tmp_path / "out", per_class=4, holdout_per_class=1,
                             seed=0, shard_size=10, test_fraction=0.25, progress=False)
    assert manifest["classes"] == ["cat", "dog", "eel"]
    assert manifest["mode"] == "RGB"
    counts = {k: v["count"] for k, v in manifest["splits"].items()}
    assert counts == {"labeled": 9, "holdout": 3, "unlabeled": 15, "test": 9}
    info = open_data(tmp_path / "out")
    labeled = load_labeled_split(info, "labeled")
    assert all(im.dtype == np.uint8 and im.shape[2] == 3 for im in labeled.images)
    assert {im.shape[:2] for im in labeled.images} <= {(20, 24), (33, 17)}
    keys = [k for split in ("labeled", "holdout", "unlabeled", "test") for k in keys_of(tmp_path / "out", split)]
    assert len(keys) == len(set(keys)) == 36
    assert all("." not in k for k in keys)
    again = import_folder(tmp_path / "src", tmp_path / "out2", per_class=4, holdout_per_class=1,
                          seed=0, shard_size=10, test_fraction=0.25, progress=False)
    assert again["splits"] == manifest["splits"]


def test_an_import_of_another_folder_or_a_changed_one_into_the_same_out_is_refused(tmp_path, monkeypatch):
    """Returning the existing import would silently ignore the new images."""
    make_folder(tmp_path / "src")
    args = dict(per_class=4, seed=0, shard_size=10, progress=False)
    first = import_folder(tmp_path / "src", tmp_path / "out", **args)
    import_folder(tmp_path / "src", tmp_path / "capped", **args, max_unlabeled=5)
    monkeypatch.chdir(tmp_path)
    assert import_folder("src", tmp_path / "out", **args) == first  # the same folder by another path: done
    make_folder(tmp_path / "other")
    with pytest.raises(DataSourceError, match=r"already holds an import of the image folder .*src, not .*other"):
        import_folder(tmp_path / "other", tmp_path / "out", **args)
    Image.fromarray(np.zeros((20, 24), dtype=np.uint8), "L").save(tmp_path / "src" / "cat" / "new.png")
    with pytest.raises(DataSourceError, match="holds 36 images imported from .*src, which now holds 37"):
        import_folder(tmp_path / "src", tmp_path / "out", **args)
    (tmp_path / "src" / "cat" / "new.png").unlink()
    assert import_folder("src", tmp_path / "out", **args) == first  # back as it was: done
    victim = sorted((tmp_path / "src" / "dog").glob("*.png"))[0]
    Image.fromarray(np.full((40, 40), 200, dtype=np.uint8), "L").save(victim)  # replaced: same count
    with pytest.raises(DataSourceError, match="whose images have changed since"):
        import_folder(tmp_path / "src", tmp_path / "out", **args)
    with pytest.raises(DataSourceError, match="whose images have changed since"):  # a cap hides the count only
        import_folder(tmp_path / "src", tmp_path / "capped", **args, max_unlabeled=5)


def test_a_renamed_image_reads_as_a_changed_folder(tmp_path):
    make_folder(tmp_path / "src")
    args = dict(per_class=4, seed=0, shard_size=10, progress=False)
    import_folder(tmp_path / "src", tmp_path / "out", **args)
    victim = sorted((tmp_path / "src" / "eel").glob("*.png"))[0]
    victim.rename(victim.with_name("renamed.png"))
    with pytest.raises(DataSourceError, match="whose images have changed since"):
        import_folder(tmp_path / "src", tmp_path / "out", **args)


def test_folder_import_rejects_undecodable_image(tmp_path):
    make_folder(tmp_path / "src")
    (tmp_path / "src" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataSourceError, match="broken.png"):
        import_folder(tmp_path / "src", tmp_path / "out", per_class=4, progress=False)


def test_shards_are_plain_tars(tiny_data):
    info = open_data(tiny_data)
    with tarfile.open(info.shard_paths("labeled")[0]) as tar:
        names = tar.getnames()
    assert names[0].endswith(".cls") and names[1].endswith(".png")


def test_hidden_files_and_folders_are_skipped_and_other_files_reported(tmp_path, capsys):
    """A notebook's .ipynb_checkpoints copy would put one picture in train and test; a macOS ._ file
    is no image at all; a BMP is neither imported silently nor dropped silently."""
    make_folder(tmp_path / "src")
    shutil.copytree(tmp_path / "src" / "cat", tmp_path / "src" / "cat" / ".ipynb_checkpoints")
    (tmp_path / "src" / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "src" / "dog" / ".DS_Store").write_bytes(b"junk")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "src" / "eel" / "extra.bmp")
    manifest = import_folder(tmp_path / "src", tmp_path / "out", per_class=4, seed=0, shard_size=10, progress=False)
    assert sum(split["count"] for split in manifest["splits"].values()) == 36
    assert manifest["skipped_files"] == {"count": 1, "examples": [str(tmp_path / "src" / "eel" / "extra.bmp")]}
    assert "1 file(s) are no class's PNG/JPEG/WebP image" in capsys.readouterr().out
    for image in (tmp_path / "src" / "eel").glob("*.*g"):
        image.unlink()
    with pytest.raises(DataSourceError, match=r"class folder 'eel' has no PNG/JPEG/WebP images \(it holds .bmp"):
        import_folder(tmp_path / "src", tmp_path / "out2", per_class=4, progress=False)


def test_two_imports_into_one_directory_at_once_take_turns(tiny_fashion_dir, tmp_path):
    """The same `selftrain data` in every job of an array: both wrote NAME.tmp, one crashed on the rename and
    the other recorded the sha256 of an empty file. The second now waits, then reuses the finished import."""
    import hashlib
    import subprocess
    import sys
    import time

    from pipeline.core.owned import one_writer

    out = tmp_path / "imp"
    command = [sys.executable, "-m", "pipeline.cli", "data", "fashion-mnist", "--source", str(tiny_fashion_dir),
               "--out", str(out), "--labels-per-class", "5", "--shard-size", "50"]
    logs = [tmp_path / f"job{i}.err" for i in range(2)]
    with one_writer(out, "test"):  # both start while the directory is held, so they meet at the lock
        jobs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w")) for log in logs]
        deadline = time.time() + 120
        while time.time() < deadline and not all("waiting for it" in log.read_text() for log in logs):
            time.sleep(0.2)
        assert all("waiting for it to finish" in log.read_text() for log in logs)
    assert [job.wait(timeout=300) for job in jobs] == [0, 0], [log.read_text() for log in logs]
    manifest = json.loads((out / "manifest.json").read_text())
    for name, split in manifest["splits"].items():
        for shard in split["shards"]:
            assert hashlib.sha256((out / name / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]


def test_a_directory_that_cannot_be_locked_is_written_with_a_warning(tmp_path, monkeypatch, capsys):
    """NFS emulates flock with byte-range locks, which a directory (opened read-only) cannot take."""
    import errno
    import fcntl

    from pipeline.core.owned import one_writer

    def nfs(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(fcntl, "flock", nfs)
    with one_writer(tmp_path / "out", "selftrain data"):
        (tmp_path / "out" / "manifest.json").write_text("{}")
    assert "selftrain data: warning: cannot lock" in capsys.readouterr().err


def test_linked_folders_are_imported_and_stray_files_and_dangling_links_named(tmp_path, capsys):
    """rglob does not enter a linked sub-folder: its images were left out of the import unseen; a dangling
    link and an image beside the class folders were dropped without a word."""
    make_folder(tmp_path / "src")
    (tmp_path / "more").mkdir()
    for name in sorted(p.name for p in (tmp_path / "src" / "dog").iterdir())[:4]:
        (tmp_path / "src" / "dog" / name).rename(tmp_path / "more" / name)
    (tmp_path / "src" / "dog" / "linked").symlink_to(tmp_path / "more")
    (tmp_path / "src" / "dog" / "up").symlink_to(tmp_path / "src" / "dog")  # a loop: followed once
    (tmp_path / "src" / "eel" / "gone.png").symlink_to(tmp_path / "moved-away.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "src" / "stray.png")
    manifest = import_folder(tmp_path / "src", tmp_path / "out", per_class=4, seed=0, shard_size=10, progress=False)
    assert sum(split["count"] for split in manifest["splits"].values()) == 36
    assert manifest["skipped_files"]["count"] == 2
    assert set(manifest["skipped_files"]["examples"]) == {str(tmp_path / "src" / "stray.png"),
                                                          str(tmp_path / "src" / "eel" / "gone.png")}


def imported_folder_run(tmp_path) -> list[str]:
    """`selftrain run` arguments of a tiny run on an image folder (tmp_path/src) whose data stage is done."""
    from conftest import TINY_TEACHER, set_args
    from pipeline.cli import main

    make_folder(tmp_path / "src")
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: 0\ndata:\n  source: folder\n  path: {tmp_path / 'src'}\n  labels_per_class: 4\n")
    args = ["run", str(config), "--run-dir", str(tmp_path / "run")] + set_args(TINY_TEACHER)
    assert main(args + ["--only", "data"]) == 0
    return args


def test_a_run_on_a_folder_changed_since_its_import_is_refused(tmp_path, capsys):
    """The data stage is done and skipped: the rounds trained on the old import of a changed folder."""
    from pipeline.cli import main

    args = imported_folder_run(tmp_path)
    Image.fromarray(np.zeros((20, 24), dtype=np.uint8), "L").save(tmp_path / "src" / "cat" / "new.png")
    capsys.readouterr()
    assert main(args + ["--only", "teacher"]) == 2
    err = capsys.readouterr().err
    assert "which now holds 37; rerun with --from data to import the folder as it is now" in err
    assert not (tmp_path / "run" / "teacher").exists()


def test_a_run_on_an_import_refuses_a_class_filter_or_cap_the_import_was_not_made_with(tiny_data, tmp_path, capsys):
    """`data.source: shards` ignored data.classes and data.max_unlabeled: a 2-class run trained 10 classes."""
    from conftest import TINY_TEACHER, set_args, tiny_config
    from pipeline.cli import main

    config = tiny_config(tmp_path, tiny_data)
    def args(run: str) -> list[str]:
        return ["run", str(config), "--run-dir", str(tmp_path / run), "--only", "data"] + set_args(TINY_TEACHER)
    assert main(args("a") + ["--set", "data.classes=['1', '2']"]) == 2
    assert "data.classes ['1', '2'] (out_of_domain_unlabeled False) is not the class filter the import" in \
        capsys.readouterr().err
    assert main(args("b") + ["--set", "data.max_unlabeled=20"]) == 2
    assert "data.max_unlabeled is 20, but the import at data.path was made with None" in capsys.readouterr().err
    assert main(args("b") + ["--preset", "quick"]) == 2  # the preset's cap: the way out named
    assert "--set data.max_unlabeled=null (`--preset quick` sets it to 10000)" in capsys.readouterr().err
    assert main(args("b") + ["--set", "data.out_of_domain_unlabeled=true"]) == 2
    assert "data.out_of_domain_unlabeled needs data.classes" in capsys.readouterr().err
    assert main(args("c")) == 0
    # the import's own split settings are not read with source: shards, so changing them is no new input
    assert main(args("c") + ["--set", "data.labels_per_class=7", "--set", "data.seed=3"]) == 0
    assert "[data] done already" in capsys.readouterr().out


def test_a_class_filter_must_name_the_imports_classes_not_only_their_count(tiny_fashion_dir, tmp_path, capsys):
    from conftest import TINY_TEACHER, set_args
    from pipeline.cli import main

    import_fashion_mnist(tmp_path / "imp", str(tiny_fashion_dir), per_class=5, shard_size=100, progress=False,
                         class_filter=ClassFilter(("0", "1")))
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: 0\ndata:\n  source: shards\n  path: {tmp_path / 'imp'}\n")

    def run(name: str, classes: str) -> int:
        return main(["run", str(config), "--run-dir", str(tmp_path / name), "--only", "data",
                     "--set", f"data.classes={classes}"] + set_args(TINY_TEACHER))
    assert run("other", "['5', '6']") == 2  # two classes, but not these two
    assert "is not the class filter the import at data.path was made with" in capsys.readouterr().err
    assert run("by_index", "['0', '1']") == 0 and run("by_name", "['T-shirt/top', 'Trouser']") == 0


def test_a_run_whose_image_folder_is_gone_uses_its_finished_import(tmp_path, capsys):
    from pipeline.cli import main

    args = imported_folder_run(tmp_path)
    (tmp_path / "src").rename(tmp_path / "moved")
    assert main(args + ["--only", "teacher"]) == 0
    assert "is not there any more; the finished import" in capsys.readouterr().out


def test_a_class_filter_takes_a_folder_named_by_a_number_as_a_name_not_a_position(tmp_path, capsys):
    """Folders 1..10 sort as 1, 10, 2, ...: `--classes 1,2` imported folders '10' and '2' without a word."""
    from pipeline.cli import main

    names = [str(c) for c in range(1, 11)]
    assert ClassFilter(("1", "2")).resolve(sorted(names)) == [0, 2]  # sorted: 1, 10, 2, ...
    assert ClassFilter(("0", "3")).resolve(sorted(names)) == [0, 3]  # no folder '0': positions, as before
    for c in names:
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 20 * int(c), np.uint8)).save(tmp_path / "src" / c / f"{i}.png")
    assert main(["data", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--labels-per-class", "2",
                 "--classes", "1,2"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"] == ["1", "2"]
    assert "classes (labels 0..1): 1, 2" in capsys.readouterr().out


def test_an_output_inside_the_image_folder_is_refused_naming_both(tmp_path, capsys):
    """`selftrain data folder . --out imported` (or a run directory under the image folder) said "class folder
    'imported' has no PNG/JPEG/WebP images": a folder the tool had made itself."""
    from pipeline.cli import main

    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "src" / c / f"{i}.png")
    assert main(["data", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "src" / "imported")]) == 2
    assert f"--out {tmp_path / 'src' / 'imported'} is inside the image folder {tmp_path / 'src'}" in capsys.readouterr().err
    assert not (tmp_path / "src" / "imported").exists()
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: folder\n  path: {tmp_path / 'src'}\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "src" / "runs" / "x")]) == 2
    assert "the run directory " in capsys.readouterr().err and not (tmp_path / "src" / "runs").exists()
