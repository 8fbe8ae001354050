"""The bench commands the README and bench/README.md quote, each run at its smallest size.

These check that a command a user copies still runs and prints the fields the README reads
(ratios, images/s); they do not check speed (timing lives in bench/, DESIGN.md §8).
`bench_int8_speed.py`, `crash_matrix.py` and `distill_goal.py` have their own tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench(script: str, *args: str, timeout: float = 300) -> list[dict]:
    """Run bench/<script> as the README does; its JSON lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=BENCH.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_train_step_measures_each_layout_and_precision():
    rows = bench("bench_train_step.py", "--arch", "test_resnet", "--size", "16", "--batch", "8", "--steps", "1")
    assert len(rows) == 1 and rows[0]["arch"] == "test_resnet"
    row = rows[0]
    rates = [value for key, value in row.items() if key.endswith("img_s")]
    assert len(rates) >= 3 and all(rate > 0 for rate in rates), row


def test_allocator_compares_glibc_defaults_with_kept_memory_in_alternating_processes():
    rows = bench("bench_allocator.py", "--model", "test_resnet:16:8:adamw", "--steps", "1", "--repeats", "2")
    assert len(rows) == 1 and rows[0]["optimizer"] == "adamw" and len(rows[0]["pair_ratios"]) == 2
    assert rows[0]["glibc_default_img_s"] > 0 and rows[0]["keep_freed_img_s"] > 0 and rows[0]["keep_freed_ratio"] > 0


def test_allocator_names_a_malformed_model_spec():
    result = subprocess.run([sys.executable, str(BENCH / "bench_allocator.py"), "--model", "resnet18:32"],
                            capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert result.returncode != 0 and "--model 'resnet18:32'" in result.stderr


def test_conv_grad_compares_onednn_with_the_small_map_gradients():
    from pipeline.engine.small_map_conv import cpu_limits

    rows = bench("bench_conv_grad.py", "--quick", "--repeats", "1")
    depthwise_taken = cpu_limits().depthwise_max_input_pixels >= 4  # the 2x2 depthwise shape: not on AVX-512
    assert [(row["depthwise"], row["trainer_takes_it"]) for row in rows] == [(False, True), (True, depthwise_taken)]
    assert {row["cpu_capability"] for row in rows} == {torch.backends.cpu.get_cpu_capability()}
    assert all(row["onednn_ms"] > 0 and row["replacement_ms"] > 0 and row["relative_difference"] < 1e-5
               for row in rows), rows


def test_augment_compares_each_policy_with_torchvision():
    rows = bench("bench_augment.py", "--policies", "s1", "s4", "rotate", "--seconds", "0.06")
    policy_rows = [row for row in rows if row["bench"] == "augment"]
    assert {row["policy"].split("-")[0] for row in policy_rows} >= {"s1", "s4"}
    assert {row["input"] for row in policy_rows} == {"28x28x1", "224x224x3"}
    assert all(row["ours_img_s"] > 0 and row["torchvision_img_s"] > 0 and row["ratio"] > 0 for row in policy_rows)
    rotate_rows = [row for row in rows if row["bench"] == "rotate op"]
    assert [row["input"] for row in rotate_rows] == ["32x32x3", "64x64x3", "224x224x3", "224xWx3, W 224-400"]
    assert all(row["ours_us"] > 0 and row["warp_affine_us"] > 0 for row in rotate_rows)


def test_cpu_bf16_check_reports_a_first_bad_step_per_size():
    rows = bench("check_cpu_bf16.py", "--sizes", "32", "--batch", "4", "--steps", "1")
    assert len(rows) == 1 and rows[0]["size"] == 32
    assert rows[0]["fp32_first_bad_step"] is None  # fp32 gradients of one step at 32 px are sane
    assert "bf16_first_bad_step" in rows[0]


def test_input_pipeline_compares_the_real_loader_with_premade_batches(tiny_data):
    rows = bench("bench_input_pipeline.py", "--data", str(tiny_data), "--arch", "test_resnet", "--size", "16",
                 "--batch", "8", "--steps", "2", "--warmup", "1", "--reps", "1", "--workers", "0", "--premade", "2",
                 "--policy", "s1", "s4")
    assert [row["workers"] for row in rows] == [0, 0]
    for row in rows:
        assert row["real_img_s"] > 0 and row["in_memory_img_s"] > 0 and row["ratio"] > 0
        assert 0 <= row["data_wait_fraction"] <= 1



@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's inductor needs a C++ compiler")
def test_the_compile_flags_run_under_inductor(tiny_data):
    """`--compile` on the training benches (README "Benchmarks", bench/README "On a GPU"): the compiled rows
    are there and measured. About 30 s of compilation each on a 2-core CPU."""
    row, = bench("bench_train_step.py", "--arch", "test_resnet", "--size", "16", "--batch", "8", "--steps", "1",
                 "--compile")
    assert row["channels_last_compiled_img_s"] > 0 and row["compile_warmup_s"] > 0
    row, = bench("bench_input_pipeline.py", "--data", str(tiny_data), "--arch", "test_resnet", "--size", "16",
                 "--batch", "8", "--steps", "2", "--warmup", "1", "--reps", "1", "--workers", "0", "--premade", "2",
                 "--policy", "s1", "--compile")
    assert row["compile"] is True and row["real_img_s"] > 0 and row["in_memory_img_s"] > 0

def test_trainer_overhead_compares_the_trainer_with_hand_written_loops(tiny_data):
    rows = bench("bench_trainer_overhead.py", "--data", str(tiny_data), "--arch", "test_resnet", "--size", "16",
                 "--batch", "8", "--steps", "3", "--warmup", "1", "--reps", "1", "--save-every", "2", "--premade", "2")
    assert len(rows) == 1
    row = rows[0]
    assert all(row[f"{side}_img_s"] > 0 for side in ("trainer", "hand", "hand_same_kernels"))
    assert row["ratio_vs_hand"] > 0 and row["ratio_vs_same_kernels"] > 0 and row["ratio_vs_hand_with_setup"] > 0
    assert row["state_saves_per_round"] == 1 and row["device"] == "cpu"


def test_pseudo_label_compares_end_to_end_with_the_bare_forward(tiny_data, tiny_teacher_run):
    _, run = tiny_teacher_run
    rows = bench("bench_pseudo_label.py", "--data", str(tiny_data), "--teacher", str(run / "teacher" / "checkpoint"),
                 "--shards", "1", "--reps", "1", "--bare-batches", "1", "--batch", "50", "--workers", "0")
    ratio_rows = [row for row in rows if "ratio" in row]
    assert ratio_rows and all(row["real_img_s"] > 0 and row["bare_forward_img_s"] > 0 for row in ratio_rows)
    breakdown = [row for row in rows if "serial_bound_ratio" in row]
    assert len(breakdown) == 1 and breakdown[0]["us_per_image"]["forward"] > 0


@pytest.mark.slow  # 17 pipeline subprocesses: about 1.5 minutes on 2 cores, too long for every CI run
def test_streamed_pool_measures_both_pool_modes_at_two_scales(tiny_fashion_dir, tmp_path):
    rows = bench("bench_streamed_pool.py", "--work", str(tmp_path), "--source", str(tiny_fashion_dir),
                 "--labels-per-class", "10", "--max-unlabeled", "300", "--steps", "2", "--batch", "16", "--size", "16",
                 "--shuffle-buffer", "50", timeout=600)
    cases = {row["case"]: row for row in rows}
    for pool in ("memory", "streamed"):
        assert cases[f"{pool}@10x"]["pool_with_copies"] == 10 * cases[f"{pool}@1x"]["pool_with_copies"]
        assert cases[f"{pool}@1x"]["train_images_per_s"] > 0 and cases[f"pool-only {pool}@10x"]["peak_rss_mib"] > 0
    assert cases["ratios"]["streamed_rss_10x_over_1x"] > 0


def test_teacher_probe_scores_flip_averages_and_ensembles(tiny_teacher_run, tmp_path):
    _, run = tiny_teacher_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("lock"))
    shutil.copytree(copy / "teacher", copy / "teacher_again")  # an ensemble of a model with itself is that model
    rows = bench("teacher_probe.py", str(copy), "teacher", "teacher_again", "--flip", "--ensemble")
    models = {row["model"]: row for row in rows}
    assert list(models) == ["teacher", "teacher_again", "teacher+teacher_again"]
    assert models["teacher+teacher_again"]["test_top1"] == models["teacher"]["test_top1"] > 0
    assert 0 < models["teacher"]["test_flip_avg_top1"] <= 100


def test_teacher_probe_scores_the_view_distillation_feeds_the_teacher(tiny_teacher_run):
    """At the teacher's own size the distillation view is its eval view (no resize): the same top-1."""
    _, copy = tiny_teacher_run  # read only: no copy needed
    own = json.loads((copy / "teacher" / "checkpoint" / "meta.json").read_text())["input_size"]
    same = bench("teacher_probe.py", str(copy), "teacher", "--view-from", str(own))[0]
    assert same[f"test_from_{own}px_top1"] == same["test_top1"] > 0
    larger = bench("teacher_probe.py", str(copy), "teacher", "--view-from", str(2 * own))[0]
    assert 0 < larger[f"test_from_{2 * own}px_top1"] <= 100
    refused = subprocess.run([sys.executable, str(BENCH / "teacher_probe.py"), str(copy), "teacher", "--view-from", "0"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--view-from" in refused.stderr


def test_teacher_probe_names_a_stage_without_a_checkpoint(tiny_teacher_run):
    _, run = tiny_teacher_run
    result = subprocess.run([sys.executable, str(BENCH / "teacher_probe.py"), str(run), "teacher", "student_r9"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no checkpoint for student_r9" in result.stderr


def test_gpu_checks_script_passes_only_flags_its_bench_scripts_know():
    """bench/gpu_checks.sh needs a CUDA GPU, so no test runs it; it parses, the config keys it sets exist, and
    its bench commands' flags exist."""
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_checks.sh")]).returncode == 0
    script = (BENCH / "gpu_checks.sh").read_text().replace("\\\n", " ")
    from pipeline.config.loading import load_config

    keys = sorted(set(re.findall(r'--set "?([a-z_.]+)=', script)))
    assert keys == ["data.path", "runtime.progress", "runtime.workers"]
    load_config(None, ["data.path=/x", "runtime.progress=false", "runtime.workers=8"])  # raises on an unknown key
    commands = [line.split('"$PY" ', 1)[1].split() for line in script.splitlines() if '"$PY" bench/' in line]
    assert len(commands) == 4
    known_flags: dict[str, set[str]] = {}
    for words in commands:
        if words[0] not in known_flags:
            shown = subprocess.run([sys.executable, words[0], "--help"], capture_output=True, text=True, timeout=120,
                                   cwd=BENCH.parent)
            assert shown.returncode == 0, shown.stderr[-2000:]
            known_flags[words[0]] = set(re.findall(r"--[a-z][a-z0-9-]*", shown.stdout))
        known = known_flags[words[0]]
        unknown = [word for word in words if word.startswith("--") and word not in known]
        assert not unknown, f"{words[0]} does not take {unknown}"


def test_streamed_pool_bench_prints_every_case_and_the_ratios(tiny_fashion_dir, tmp_path):
    rows = bench("bench_streamed_pool.py", "--work", str(tmp_path / "work"), "--source", str(tiny_fashion_dir),
                 "--labels-per-class", "10", "--max-unlabeled", "300", "--steps", "2", "--batch", "16", "--size", "16",
                 "--shuffle-buffer", "50", timeout=900)
    cases = {row["case"]: row for row in rows}
    assert set(cases) == {"memory@1x", "streamed@1x", "memory@10x", "streamed@10x", "pool-only memory@1x",
                          "pool-only streamed@1x", "pool-only memory@10x", "pool-only streamed@10x", "ratios"}
    assert cases["memory@10x"]["pool_with_copies"] == 10 * cases["memory@1x"]["pool_with_copies"]
    assert all(cases[c]["peak_rss_mib"] > 0 and cases[c]["train_images_per_s"] > 0
               for c in ("memory@1x", "streamed@1x", "memory@10x", "streamed@10x"))
    assert all(value > 0 for key, value in cases["ratios"].items() if key not in ("case", "targets"))


def test_teacher_precision_compares_fp32_with_bf16_on_the_distillation_view(tiny_teacher_run):
    _, run = tiny_teacher_run  # read only
    row = bench("bench_teacher_precision.py", str(run), "teacher", "--view-from", "24", "--batch", "64",
                "--rounds", "1")[0]
    assert row["images"] > 0 and 0 <= row["fp32_top1"] <= 100 and 0 <= row["bf16_top1"] <= 100
    assert 90 <= row["argmax_agreement"] <= 100 and row["max_abs_logit_diff"] >= 0
    assert row["ms_per_batch"]["fp32"] > 0 and row["ms_per_batch"]["bf16"] > 0 and row["bf16_speedup"] > 0
