"""bench/bench_int8_speed.py, the command the README and the deployment table point to."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from students.export import export_onnx

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_int8_speed.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_pairs_each_int8_model_with_its_fp32_model_and_prints_speedups(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    export_onnx(model, tmp_path / "student.onnx", (1, 8, 8))
    shutil.copy(tmp_path / "student.onnx", tmp_path / "student.int8.onnx")  # the pairing, not int8, is tested
    export_onnx(model, tmp_path / "teacher.onnx", (1, 8, 8))  # no int8 file: not measured
    result = run(str(tmp_path), "--rounds", "2", "--repeats", "2", "--threads", "1", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["model"], r["threads"]) for r in rows] == [("student", 1), ("student", 2)]  # one line per thread count
    for r in rows:
        assert r["batch1_speedup"] > 0 and r["batch64_speedup"] > 0 and r["fp32_batch64_img_s"] > 0
        assert len(r["fp32_batch64_img_s_by_round"]) == len(r["int8_batch64_img_s_by_round"]) == 2
        assert min(r["fp32_batch64_img_s_by_round"]) <= r["fp32_batch64_img_s"] <= max(r["fp32_batch64_img_s_by_round"])


def test_a_directory_without_pairs_is_named_in_the_error(tmp_path):
    result = run(str(tmp_path))
    assert result.returncode == 1 and f"no <model>.onnx / <model>.int8.onnx pair in {tmp_path}" in result.stderr
