"""A reduced crash matrix (bench/crash_matrix.py): one SIGKILL inside the teacher (whole process
group) and one inside pseudo-labeling (main process only, its loader worker left running); each
rerun must finish and match an uninterrupted run byte for byte, leaving no partial file."""

import importlib.util
import json
from pathlib import Path


SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "crash_matrix.py"


def load_script():
    spec = importlib.util.spec_from_file_location("crash_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reduced_crash_matrix(tmp_path):
    matrix = load_script()
    out = tmp_path / "crash_matrix.json"
    code = matrix.main(["--stages", "teacher,pseudo_label_r1", "--trials", "1", "--workdir", str(tmp_path / "work"),
                        "--out", str(out)])
    result = json.loads(out.read_text())
    failed = [t for t in result["trials"] if not t.get("ok")]
    assert code == 0 and not failed, json.dumps(failed, indent=1, default=str)[-4000:]
    rows = {row["stage"]: row for row in result["summary"]}
    assert rows["teacher"]["kills"] == 1 and rows["teacher"]["group"] == 1
    assert rows["pseudo_label_r1"]["kills"] == 1 and rows["pseudo_label_r1"]["main_only"] == 1
    for row in rows.values():
        assert row["resumed_ok"] == row["byte_identical"] == row["clean"] == 1
    for t in result["trials"]:
        if t["outcome"] == "killed, rerun ok":
            assert t["integrity"]["tmp_files"] == [] and t["invocations"] == 2
            assert t["lost"]["within_bound"], t["lost"]
