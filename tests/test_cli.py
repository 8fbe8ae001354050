"""CLI entry points users type: data import, augmentation preview, errors as messages (exit 2)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main


def test_data_fashion_mnist_command(tiny_fashion_dir, tmp_path, capsys):
    out = tmp_path / "fm"
    assert main(["data", "fashion-mnist", "--out", str(out), "--source", str(tiny_fashion_dir),
                 "--labels-per-class", "10", "--holdout-per-class", "2", "--shard-size", "50",
                 "--max-unlabeled", "100"]) == 0
    text = capsys.readouterr().out
    assert "labeled 80" in text and "holdout 20" in text and "unlabeled 100" in text and "test 200" in text
    assert (out / "manifest.json").exists()


def test_data_errors_are_messages(tmp_path, capsys):
    assert main(["data", "fashion-mnist", "--out", str(tmp_path / "x"), "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing train-images-idx3-ubyte.gz" in err and "apt-get install -y dataset-fashion-mnist" in err
    assert main(["data", "folder", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_augment_preview(tiny_data, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["augment", "preview", "--policy", "s4", "--data", str(tiny_data), "--out", str(out),
                 "--images", "3", "--draws", "4", "--size", "32"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 3 and grid.shape[0] >= 3 * 32 and grid.shape[1] >= 5 * 32


def test_bad_policy_in_preview_is_a_message(tiny_data, tmp_path, capsys):
    assert main(["augment", "preview", "--policy", "s7", "--data", str(tiny_data), "--out",
                 str(tmp_path / "g.png")]) == 2
    assert "s7" in capsys.readouterr().err


def test_augment_preview_accepts_a_split_folder(tiny_data, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["augment", "preview", "--policy", "s1", "--data", str(tiny_data / "labeled"), "--out", str(out),
                 "--images", "2", "--draws", "2", "--size", "16"]) == 0
    assert out.exists()


def test_augment_preview_accepts_a_shard_of_every_format_the_pipeline_reads(tiny_data, tmp_path):
    """.tar.bz2 / .tar.xz shards and pipe: sources were refused by preview, which the pipeline reads."""
    import bz2
    import gzip
    import lzma

    shard = next((tiny_data / "labeled").glob("*.tar"))
    sources: list = [shard]
    for suffix, compress in ((".tar.gz", gzip.compress), (".tar.bz2", bz2.compress), (".tar.xz", lzma.compress)):
        sources.append(tmp_path / f"labeled-000000{suffix}")
        sources[-1].write_bytes(compress(shard.read_bytes()))
    sources.append(f"pipe:cat {shard}")
    for index, source in enumerate(sources):
        out = tmp_path / f"{index}.png"
        assert main(["augment", "preview", "--policy", "s1", "--data", str(source), "--out", str(out),
                     "--images", "2", "--draws", "2", "--size", "16"]) == 0
        assert out.exists()


def test_version(capsys):
    import pytest

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("selftrain 0.")


def test_help_and_version_answer_without_importing_torch():
    """`selftrain --help` / `--version` took 4.7 s here importing torch for nothing; they must stay instant."""
    import subprocess
    import sys

    probe = ("import sys\nfrom pipeline.cli import main\n"
             "for argv in (['--help'], ['run', '--help'], ['--version']):\n"
             "    try:\n        main(argv)\n    except SystemExit as exit:\n        assert exit.code == 0, argv\n"
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: selftrain run" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_run_with_the_quick_preset_applies_it_before_the_users_set(tiny_fashion_dir, tmp_path, capsys):
    """`selftrain run configs/fashion_mnist.yaml --preset quick` (what `make demo PRESET=quick` runs): the
    preset's overrides reach the saved config, a `--set` of the same key wins, an unknown preset is a message."""
    import yaml

    from pipeline.config.presets import PRESETS

    run = tmp_path / "run"
    config = str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml")
    assert main(["run", config, "--preset", "quick", "--run-dir", str(run), "--only", "data",
                 "--set", f"data.path={tiny_fashion_dir}", "--set", "data.labels_per_class=10",
                 "--set", "data.shard_size=100", "--set", "teacher.train.epochs=1"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["teacher"]["train"]["epochs"] == 1  # the user's --set, over the preset's 20
    for override in PRESETS["quick"]:
        key, value = override.split("=")
        if key != "teacher.train.epochs":
            section = saved
            for part in key.split("."):
                section = section[part]
            assert section == yaml.safe_load(value), key
    assert (run / "data" / "manifest.json").exists()
    capsys.readouterr()
    assert main(["run", config, "--preset", "fast", "--run-dir", str(tmp_path / "other")]) == 2
    assert "--preset 'fast': unknown preset; presets are quick" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_preview_of_a_raw_image_folder_says_to_import_it_elsewhere(tmp_path, capsys):
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "photos" / "cat" / "a.png")
    assert main(["augment", "preview", "--policy", "s1", "--data", str(tmp_path / "photos"),
                 "--out", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert "not an imported data directory" in err and "--out DIR" in err and f"--out {tmp_path}" not in err


def test_a_folder_of_foreign_shards_given_as_an_import_points_to_webdataset(tmp_path):
    from pipeline.data.imageset import DataDirError, open_data

    (tmp_path / "pool-000000.tar").write_bytes(b"")
    with pytest.raises(DataDirError, match="used in place with data.source: webdataset"):
        open_data(tmp_path)


def test_an_output_place_that_cannot_be_written_is_named_not_a_traceback(tiny_data, tmp_path, capsys, monkeypatch):
    """`data --out`, `augment preview --out` and `compare --out` under a folder the user cannot write to gave a
    PermissionError traceback. A read-only folder is refused up front; a failure to create is named too."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))  # root
    compare = tmp_path / "c.yaml"
    compare.write_text("axes: {init: [random], self_training: [off], policy: [s1], labels_per_class: [4], seeds: [0]}\n")
    for argv in (["data", "fashion-mnist", "--source", str(tmp_path), "--out", str(locked / "d")],
                 ["augment", "preview", "--policy", "s1", "--data", str(tiny_data), "--out", str(locked / "g.png")],
                 ["compare", str(compare), "--out", str(locked / "cmp")]):
        assert main(argv) == 2, argv
        assert f"{locked} is not writable for this user; nothing was written" in capsys.readouterr().err, argv
    monkeypatch.setattr(os, "access", real_access)
    from pipeline.core.owned import one_writer
    from pipeline.core.atomic import WriteFailed

    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(WriteFailed, match=r"cannot create .*: Permission denied"):
        with one_writer(tmp_path / "new", "test"):
            pass


def test_empty_arguments_are_refused_not_taken_for_defaults(tmp_path, capsys):
    """`data --classes ''` imported every class; `run --run-dir ''` wrote into runs/<config name>."""
    assert main(["data", "fashion-mnist", "--source", str(tmp_path), "--out", str(tmp_path / "d"), "--classes", ""]) == 2
    assert "--classes '': no class named" in capsys.readouterr().err
    assert main(["run", "configs/fashion_mnist.yaml", "--run-dir", ""]) == 2
    assert "--run-dir '': give a directory" in capsys.readouterr().err
