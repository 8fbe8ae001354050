"""Where a command is told to write or read: another file is never overwritten, and a wrong path is one clear line.

`summarize --out` and `augment preview --out` replace only a file they wrote (a first-line mark, a PNG text
chunk); `--out` of an import or a compare must be a directory; `status` reads only run directories; `predict`
names a file that is no ONNX model, a stage directory given for its checkpoint, and a missing image.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.core.output_paths import OutputPathError, check_output_dir, check_output_file
from pipeline.core.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(args: list[str], capsys, watched: Path | None = None) -> str:
    """Exit 2 with one `selftrain: error:` line, no traceback, and `watched` (a file) unchanged."""
    before = digest(watched) if watched is not None else None
    assert main(args) == 2
    if watched is not None:
        assert digest(watched) == before, f"{watched} changed"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "selftrain: error:" in err
    return err[err.index("selftrain: error:"):]


def fake_run(root: Path) -> Path:
    """A run directory with a finished teacher (what summarize reads)."""
    run = RunDir(root)
    root.mkdir(parents=True)
    run.config_path.write_text("seed: 0\n")
    run.stage_dir("teacher").mkdir()
    run.metrics_path("teacher").write_text(json.dumps({"top1": 0.8}))
    run.mark_done("teacher")
    return root


# ---- the shared check ------------------------------------------------------------------------------------

def test_output_file_check_refuses_what_it_did_not_write(tmp_path):
    def never(_: Path) -> bool:
        return False

    def always(_: Path) -> bool:
        return True

    check_output_file(tmp_path / "new.md", flag="--out", suffix=".md", command="x", written_by_us=never)
    check_output_file(tmp_path / "NEW.MD", flag="--out", suffix=".md", command="x", written_by_us=never)
    (tmp_path / "mine.md").write_text("t")
    check_output_file(tmp_path / "mine.md", flag="--out", suffix=".md", command="x", written_by_us=always)
    with pytest.raises(OutputPathError, match=r"--out .*mine\.md already exists and was not written by x"):
        check_output_file(tmp_path / "mine.md", flag="--out", suffix=".md", command="x", written_by_us=never)
    with pytest.raises(OutputPathError, match=r"x writes a \.md file; give a file name ending in \.md"):
        check_output_file(tmp_path / "t.txt", flag="--out", suffix=".md", command="x", written_by_us=always)
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output_file(tmp_path, flag="--out", suffix=".md", command="x", written_by_us=always)
    (tmp_path / "link.md").symlink_to(tmp_path / "mine.md")
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        check_output_file(tmp_path / "link.md", flag="--out", suffix=".md", command="x", written_by_us=always)
    with pytest.raises(OutputPathError, match=r"mine\.md is a file, not a directory"):
        check_output_file(tmp_path / "mine.md" / "t.md", flag="--out", suffix=".md", command="x",
                          written_by_us=always)


def test_output_dir_check_refuses_a_file(tmp_path):
    check_output_dir(tmp_path)
    check_output_dir(tmp_path / "new" / "deeper")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match=r"--out .*f is a file; give a directory"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(OutputPathError, match=r"f is a file, not a directory"):
        check_output_dir(tmp_path / "f" / "sub")


# ---- 1, 2: summarize --out and augment preview --out ---------------------------------------------------------

def test_summarize_refreshes_its_own_table_and_refuses_any_other_file(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    table = tmp_path / "table.md"
    assert main(["summarize", str(run), "--out", str(table)]) == 0
    assert main(["summarize", str(run), "--out", str(table)]) == 0  # a rerun refreshes its own table
    text = table.read_text()
    assert text.splitlines()[0] == "<!-- written by selftrain summarize -->" and "| teacher | 1 |" in text
    capsys.readouterr()

    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    err = refused(["summarize", str(run), "--out", str(notes)], capsys, watched=notes)
    assert f"--out {notes} already exists and was not written by selftrain summarize" in err

    config = tmp_path / "config.yaml"
    config.write_text("seed: 0\n")
    err = refused(["summarize", str(run), "--out", str(config)], capsys, watched=config)
    assert f"--out {config}: selftrain summarize writes a .md file" in err

    (tmp_path / "dir.md").mkdir()
    assert f"--out {tmp_path / 'dir.md'} is a directory" in refused(
        ["summarize", str(run), "--out", str(tmp_path / "dir.md")], capsys)
    assert f"--out {tmp_path} is a directory" in refused(["summarize", str(run), "--out", str(tmp_path)], capsys)


def test_preview_rewrites_its_own_grid_and_refuses_any_other_file(tiny_data, tmp_path, capsys):
    args = ["augment", "preview", "--policy", "s1", "--data", str(tiny_data), "--images", "2", "--draws", "1",
            "--size", "16", "--out"]
    grid = tmp_path / "grid.png"
    assert main(args + [str(grid)]) == 0
    assert Image.open(grid).info["Software"] == "selftrain augment preview"
    assert main(args + [str(grid)]) == 0  # its own grid: replaced
    capsys.readouterr()

    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(photo)
    err = refused(args + [str(photo)], capsys, watched=photo)
    assert f"--out {photo} already exists and was not written by selftrain augment preview" in err

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    refused(args + [str(broken)], capsys, watched=broken)

    config = tmp_path / "config.yaml"
    config.write_text("seed: 0\n")
    assert f"--out {config}: selftrain augment preview writes a .png file" in refused(
        args + [str(config)], capsys, watched=config)
    assert f"--out {tmp_path} is a directory" in refused(args + [str(tmp_path)], capsys)


# ---- 3: --out of an import or a compare that is a file ------------------------------------------------------

def test_data_import_out_that_is_a_file_is_refused(tmp_path, capsys):
    source = tmp_path / "images"
    for name in ("a", "b"):
        (source / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(source / name / f"{i}.png")
    out = tmp_path / "out"
    out.write_text("a user's file\n")
    err = refused(["data", "folder", str(source), "--out", str(out), "--labels-per-class", "1"], capsys, out)
    assert f"--out {out} is a file; give a directory" in err
    err = refused(["data", "fashion-mnist", "--out", str(out / "sub")], capsys, out)
    assert f"{out} is a file, not a directory" in err


def test_compare_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a user's file\n")
    for extra in ([], ["--dry-run"]):
        err = refused(["compare", str(REPO / "configs" / "compare_fashion_mnist.yaml"), "--out", str(out)] + extra,
                      capsys, out)
        assert f"--out {out} is a file; give a directory" in err


# ---- 4: status of something that is not a run directory ------------------------------------------------------

def test_status_refuses_what_is_not_a_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'} is not a run directory (no config.yaml)" in refused(
        ["status", str(tmp_path / "empty")], capsys)
    (tmp_path / "file").write_text("x")
    assert f"{tmp_path / 'file'} is not a run directory" in refused(["status", str(tmp_path / "file")], capsys)
    assert "does not exist" in refused(["status", str(tmp_path / "nope")], capsys)


def test_status_of_a_run_whose_first_stage_has_not_finished(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config_path.write_text("seed: 0\n")
    run.stage_list_path.write_text(json.dumps({"stages": ["data", "teacher", "report"]}))
    assert main(["status", str(run.root)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [["data", "pending"], ["teacher", "pending"], ["report", "pending"]]
    run.config_path.unlink()  # the run marker alone (written when the directory was claimed) is enough
    (run.root / ".selftrain-run").write_text("selftrain run directory\n")
    assert main(["status", str(run.root)]) == 0
    run.stage_list_path.unlink()  # a first run refused before any stage: no config to list (the default one's
    capsys.readouterr()           # stages were listed, not the user's)
    assert main(["status", str(run.root)]) == 0
    assert "no stage has run yet (no config.yaml)" in capsys.readouterr().out


def test_summarize_refuses_a_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "is not a run directory (no config.yaml)" in refused(["summarize", str(tmp_path / "empty")], capsys)


# ---- 5: predict ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory) -> Path:
    """RUN/teacher with an (untrained) checkpoint/ inside, as the teacher stage leaves it."""
    from teachers.checkpoint import CheckpointMeta, save_checkpoint
    from teachers.models import create_model

    stage = tmp_path_factory.mktemp("run") / "teacher"
    meta = CheckpointMeta(arch="test_resnet", num_classes=3, in_chans=1, input_size=16, mean=(0.5,), std=(0.25,),
                          class_names=("a", "b", "c"), config_hash="0")
    save_checkpoint(stage / "checkpoint", create_model("test_resnet", 3, 1), meta)
    return stage


def test_predict_names_a_file_that_is_no_onnx_model(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk\n\x00\xff" * 10)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    assert f"{junk}: not a valid ONNX file" in refused(["predict", str(junk), str(image)], capsys, junk)
    assert f"{tmp_path / 'missing.onnx'} does not exist" in refused(
        ["predict", str(tmp_path / "missing.onnx"), str(image)], capsys)


def test_predict_hints_at_the_checkpoint_inside_a_stage_directory(stage_dir, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    err = refused(["predict", str(stage_dir), str(image)], capsys)
    assert f"did you mean {stage_dir / 'checkpoint'}?" in err


def test_predict_says_a_missing_image_does_not_exist_and_predicts_the_others(stage_dir, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    missing = tmp_path / "missing.png"
    assert main(["predict", str(stage_dir / "checkpoint"), str(missing), str(image), "--json"]) == 2
    captured = capsys.readouterr()
    assert f"{missing}: image does not exist" in captured.err and "FileNotFoundError" not in captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["image"] for line in lines] == [str(missing), str(image)]
    assert lines[0] == {"image": str(missing), "error": "image does not exist"}


def tiny_onnx(path: Path, meta_json: str, op: str = "Identity") -> Path:
    """A one-node ONNX model carrying `meta_json` as its selftrain metadata."""
    import onnx
    from onnx import TensorProto, helper

    from pipeline.engine.serving import ONNX_META_KEY

    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 16, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {ONNX_META_KEY: meta_json})
    onnx.save(model, str(path))
    return path


def test_predict_names_damaged_onnx_metadata_and_a_model_onnxruntime_cannot_load(tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    damaged = tiny_onnx(tmp_path / "damaged.onnx", "{not json")
    assert f"{damaged}: its 'selftrain_meta' metadata is damaged" in refused(
        ["predict", str(damaged), str(image)], capsys)
    meta = json.dumps({"arch": "x", "num_classes": 1, "in_chans": 1, "input_size": 16, "mean": [0.5],
                       "std": [0.5], "class_names": ["a"], "config_hash": "0"})
    unknown_op = tiny_onnx(tmp_path / "unknown_op.onnx", meta, op="NoSuchOperator")
    assert f"{unknown_op}: onnxruntime cannot load this ONNX model" in refused(
        ["predict", str(unknown_op), str(image)], capsys)


def test_predict_refuses_an_onnx_graph_its_metadata_does_not_describe(tmp_path, capsys):
    """Metadata copied onto another model: an onnxruntime traceback on the first batch, or class names on
    logits they do not belong to."""
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)

    def meta(input_size: int, classes: int) -> str:
        return json.dumps({"arch": "x", "num_classes": classes, "in_chans": 1, "input_size": input_size,
                           "mean": [0.5], "std": [0.5], "class_names": [str(i) for i in range(classes)],
                           "config_hash": "0"})
    other_size = tiny_onnx(tmp_path / "size.onnx", meta(32, 16))  # the graph takes 1 x 1 x 16 x 16
    assert (f"{other_size}: the graph takes one input of shape [1, 1, 16, 16], and its 'selftrain_meta' metadata "
            "describes N x 1 x 32 x 32 images") in refused(["predict", str(other_size), str(image)], capsys)
    other_width = tiny_onnx(tmp_path / "width.onnx", meta(16, 10))  # the graph gives 16 values a row
    assert f"{other_width}: the graph gives 16 logits, and its 'selftrain_meta' metadata names 10 classes" in refused(
        ["predict", str(other_width), str(image)], capsys)


def test_predict_prints_a_file_name_that_is_not_utf8(stage_dir, tmp_path, capsysbinary):
    """A name's undecodable bytes crashed the text output under a strict UTF-8 stdout."""
    import os
    import subprocess
    import sys

    name = os.fsdecode(b"caf\xe9.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / name)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(stage_dir / "checkpoint"),
                             str(tmp_path)], capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.startswith(os.fsencode(tmp_path / name) + b": ")
