"""Distill stage: consistent views, offline logits, CE only on labeled rows, kill-and-resume, ShuffleNet."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TEACHER, record_as_made_before, set_args
from pipeline.config.loading import load_config
from pipeline.core.faults import env_name
from pipeline.data.loader import Batch
from pipeline.stages.distill import kd_loss_fn
from teachers.checkpoint import CheckpointMeta

DISTILL = ["student.rounds=0", "pseudo_label.batch_size=100", "runtime.threads=1",
           "distill.students=[{arch: test_efficientnet, input_size: 24}]", "distill.labeled_batch=8",
           "distill.train.batch_size=24", "distill.train.epochs=1", "distill.train.save_every_steps=4",
           "distill.train.lr=0.01", "distill.train.warmup_epochs=0"]
STAGE = "distill_test_efficientnet"


def cli(config: Path, run: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run)]
    args += set_args(TINY_TEACHER + DISTILL) + list(extra)
    return subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def copy_run(tiny_teacher_run, tmp_path: Path, name: str) -> tuple[Path, Path]:
    config, run = tiny_teacher_run
    shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("lock"))
    return config, tmp_path / name


def kill_resume_and_compare(config: Path, straight: Path, killed: Path, *extra: str,
                            parts: tuple[str, ...] = ("checkpoint",)) -> None:
    """SIGKILL `killed` at step 6 (state saved at 4), rerun it, and compare its weights with `straight`'s."""
    dead = cli(config, killed, *extra, env={env_name("step"): "6"})
    assert dead.returncode == -9 and (killed / STAGE / "state").exists()
    again = cli(config, killed, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 4" in again.stdout + again.stderr
    for part in parts:
        a = load_file(str(straight / STAGE / part / "model.safetensors"))
        b = load_file(str(killed / STAGE / part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


class Recorder(torch.nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.autocast: list[bool] = []
        self.classes = classes

    def forward(self, x):
        self.seen.append(x.detach().clone())
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return x.mean(dim=(2, 3)).repeat(1, self.classes)[:, :self.classes]


def fake_setup(mean=0.5, std=0.25, autocast=nullcontext):
    stats = (torch.tensor([mean]), torch.tensor([std]))
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu"), autocast=autocast),
                           device_stats=lambda: stats, channels_last=False)


def test_online_teacher_sees_exactly_the_students_view_with_its_own_preprocessing():
    from students.kd_teacher import TeacherView

    config = load_config(None, ["distill.alpha=0.5", "distill.beta=0.5"])
    teacher_model = Recorder()
    teacher = TeacherView(teacher_model, CheckpointMeta("x", 3, 1, 8, (0.1,), (0.2,), ("a", "b", "c"), "h"),
                          torch.device("cpu"), channels_last=False)
    ctx = SimpleNamespace(config=config)
    loss_fn = kd_loss_fn(ctx, fake_setup(), teacher, torch.tensor([0, 1, 2]), None, 3)
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    batch = Batch(images, torch.tensor([0, 0, 1, 1]), torch.tensor([2, 0, 5, 6]))
    student = Recorder()
    loss_fn(student, batch)
    view = images.float() / 255
    torch.testing.assert_close(student.seen[0], (view - 0.5) / 0.25)  # the student's own normalisation
    resized = torch.nn.functional.interpolate(view, size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(teacher_model.seen[0], (resized - 0.1) / 0.2)  # same view, teacher's size/stats


def test_online_teacher_runs_in_the_students_mixed_precision():
    """An fp32 teacher beside a bf16/fp16 student dominated a GPU step: the teacher takes the training autocast."""
    from students.kd_teacher import TeacherView

    config = load_config(None, [])
    teacher_model = Recorder()
    teacher = TeacherView(teacher_model, CheckpointMeta("x", 3, 1, 8, (0.1,), (0.2,), ("a", "b", "c"), "h"),
                          torch.device("cpu"), channels_last=False)
    mixed = fake_setup(autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    loss_fn = kd_loss_fn(SimpleNamespace(config=config), mixed, teacher, torch.tensor([0, 1, 2]), None, 3)
    batch = Batch(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8), torch.tensor([0, 1]),
                  torch.tensor([2, 0]))
    loss_fn(Recorder(), batch)
    assert teacher_model.autocast == [True]
    kd_loss_fn(SimpleNamespace(config=config), fake_setup(), teacher, torch.tensor([0, 1, 2]), None, 3)(
        Recorder(), batch)
    assert teacher_model.autocast == [True, False]  # no mixed precision: fp32 as before


def test_an_ensemble_teaches_the_mean_of_its_members_softened_outputs_each_at_its_own_size():
    from students.kd_teacher import EnsembleTeacher, TeacherView, mean_softened

    logits = torch.randn(3, 5, 4) * 3
    for temperature in (1.0, 2.0):
        taught = mean_softened(logits, temperature)
        torch.testing.assert_close((taught / temperature).softmax(-1), (logits / temperature).softmax(-1).mean(0))
    one = mean_softened(logits[:1], 2.0)  # one member: its own distribution, logits shifted per row
    torch.testing.assert_close((one / 2.0).softmax(-1), (logits[0] / 2.0).softmax(-1))
    small, large = Recorder(4), Recorder(4)
    members = [TeacherView(model, CheckpointMeta("x", 4, 1, size, (0.5,), (0.25,), tuple("abcd"), "h"),
                           torch.device("cpu"), channels_last=False) for model, size in ((small, 8), (large, 16))]
    view = torch.rand(2, 1, 16, 16)
    out = EnsembleTeacher(members, 2.0)(view)
    resized = torch.nn.functional.interpolate(view, size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(small.seen[0], (resized - 0.5) / 0.25)  # each member at its own size
    torch.testing.assert_close(large.seen[0], (view - 0.5) / 0.25)
    torch.testing.assert_close(out, mean_softened(torch.stack([members[0](view), members[1](view)]), 2.0))


def test_unlabeled_rows_contribute_no_cross_entropy():
    config = load_config(None, ["distill.alpha=1.0", "distill.beta=0.0"])
    ctx = SimpleNamespace(config=config)
    offline = torch.zeros(3 + 4, 3)
    loss_fn = kd_loss_fn(ctx, fake_setup(), None, torch.tensor([0, 1, 2]), offline, 3)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    only_unlabeled = loss_fn(student, Batch(images, torch.tensor([1, 1, 1]), torch.tensor([0, 1, 2])))
    assert only_unlabeled["loss_ce"].item() == 0.0 and only_unlabeled["loss"].item() == 0.0
    mixed = loss_fn(student, Batch(images, torch.tensor([0, 1, 1]), torch.tensor([2, 1, 2])))
    logits = student(((images.float() / 255 - 0.5) / 0.25))
    torch.testing.assert_close(mixed["loss_ce"], torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2])))


def test_distill_online_and_offline_end_to_end(tiny_teacher_run, tmp_path):
    config, run = copy_run(tiny_teacher_run, tmp_path, "online")
    result = cli(config, run)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / STAGE / "metrics.json").read_text())
    assert metrics["mode"] == "online" and metrics["input_size"] == 24 and 0 <= metrics["teacher_agreement"] <= 1
    assert metrics["teacher_arch"] == "test_resnet" and metrics["num_unlabeled"] == 400
    meta = json.loads((run / STAGE / "checkpoint" / "meta.json").read_text())
    assert meta["arch"] == "test_efficientnet" and meta["input_size"] == 24
    _, off = copy_run(tiny_teacher_run, tmp_path, "offline")
    result = cli(config, off, "--set", "distill.mode=offline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((off / STAGE / "metrics.json").read_text())["mode"] == "offline"
    assert (off / "pseudo_label_r1" / "DONE").exists()  # offline reuses the teacher's own sidecars
    # an ensemble teacher: the resnet teacher and the student just distilled (another arch and input size)
    _, ens = copy_run(tiny_teacher_run, tmp_path, "ensemble")
    member = run / STAGE / "checkpoint"
    result = cli(config, ens, "--set", f"distill.ensemble=[{member}]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with 1 more ensemble member(s)" in result.stdout
    metrics = json.loads((ens / STAGE / "metrics.json").read_text())
    single = json.loads((run / STAGE / "metrics.json").read_text())
    assert metrics["ensemble"] == [str(member)] and metrics["ensemble_member_top1"] == [single["top1"]]
    assert metrics["teacher_top1"] == single["teacher_top1"]  # teacher_* stay the single teacher's figures
    assert 0 <= metrics["ensemble_top1"] <= 1 and 0 <= metrics["ensemble_agreement"] <= 1
    assert len(json.loads((ens / STAGE / "stage.json").read_text())["inputs"]["ensemble_sha256"]) == 1


def test_a_given_teacher_or_member_with_the_data_classes_in_another_order_is_refused_before_any_stage(
        tiny_teacher_run, tmp_path):
    """Its logits are read by class index: a checkpoint of the same class count in another order would
    teach wrong labels. Preflight names the key and the class; nothing of the run is touched."""
    config, run = copy_run(tiny_teacher_run, tmp_path, "classes")
    swapped = tmp_path / "swapped"
    shutil.copytree(run / "teacher" / "checkpoint", swapped)
    meta = json.loads((swapped / "meta.json").read_text())
    names = meta["class_names"]
    meta["class_names"] = [names[1], names[0], *names[2:]]
    (swapped / "meta.json").write_text(json.dumps(meta))
    before = sorted(p.name for p in run.iterdir())
    for key, value in [("distill.ensemble", f"[{swapped}]"), ("distill.teacher", str(swapped))]:
        result = cli(config, run, "--set", f"{key}={value}")
        assert result.returncode == 2, result.stderr[-3000:]
        where = key + ("[0]" if key == "distill.ensemble" else "")
        assert (f"{where} ({swapped}): class 0 is {names[1]!r} in the checkpoint but {names[0]!r} in the data"
                in result.stderr), result.stderr[-3000:]
        assert sorted(p.name for p in run.iterdir()) == before  # no stage started
    # the same checkpoint with the data's order is taken (the check compares names, not files)
    from pipeline.core.rundir import RunDir
    from pipeline.stages.preflight import check_given_teachers
    check_given_teachers(load_config(str(config), [f"distill.teacher={run / 'teacher' / 'checkpoint'}"]), RunDir(run),
                         reimport=False)
    # `--from data` makes the import again, so preflight leaves the check to the distill stage, which refuses the
    # teacher before training; the stages before it stay done
    result = cli(config, run, "--from", "data", "--set", f"distill.teacher={swapped}")
    assert result.returncode == 2 and "distill.teacher" in result.stderr and "in the same order" in result.stderr
    assert "[teacher]" in result.stdout  # past preflight: the import and the teacher were made again
    assert "--from data: forgot data, teacher (their files removed" in result.stdout  # said, not silent
    assert (run / "teacher" / "DONE").exists() and not (run / STAGE / "checkpoint").exists()


def test_distill_resumes_after_sigkill_to_the_same_weights(tiny_teacher_run, tmp_path):
    config, straight = copy_run(tiny_teacher_run, tmp_path, "straight")
    _, killed = copy_run(tiny_teacher_run, tmp_path, "killed")
    mix = ["--set", "distill.mixup=0.5"]  # mixup draws must resume exactly too
    assert cli(config, straight, *mix).returncode == 0
    kill_resume_and_compare(config, straight, killed, *mix)


def test_shufflenet_student_from_torchvision_distils_prunes_and_exports(tiny_teacher_run, tmp_path):
    config, run = copy_run(tiny_teacher_run, tmp_path, "shuffle")
    result = cli(config, run, "--set", "distill.students=[{arch: shufflenet_v2_x0_5, input_size: 32}]", *COMPRESS)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((run / "distill_shufflenet_v2_x0_5" / "checkpoint" / "meta.json").read_text())
    assert meta["arch"] == "shufflenet_v2_x0_5" and meta["num_classes"] == 10
    pruned = json.loads((run / "prune_shufflenet_v2_x0_5" / "metrics.json").read_text())
    assert pruned["macs_after"] <= 0.5 * pruned["macs_before"] and pruned["params_after"] < pruned["params_before"]
    table = json.loads((run / "export" / "metrics.json").read_text())
    onnx_rows = [r for r in table["rows"] if r["model"] == "prune_shufflenet_v2_x0_5" and r["precision"] == "fp32"
                 and r["runtime"] == "onnxruntime"]
    assert len(onnx_rows) == 1 and onnx_rows[0]["max_abs_logit_diff_vs_torch"] < 1e-3
    assert onnx_rows[0]["top1_agreement_vs_torch"] == 1.0 and onnx_rows[0]["macs"] == pruned["macs_after"]


COMPRESS = ["--set", "distill.prune.enabled=true", "--set", "distill.prune.steps=1",
            "--set", "distill.prune.fine_tune_steps=3", "--set", "distill.export.repeats=3",
            "--set", "distill.export.calibration_images=32", "--set", "distill.export.eval_images=64"]


def check_compressed_run(run: Path) -> None:
    pruned = json.loads((run / "prune_test_efficientnet" / "metrics.json").read_text())
    assert pruned["macs_after"] <= 0.5 * pruned["macs_before"] * 1.02 and pruned["fine_tune_steps_total"] == 3
    assert (run / "prune_test_efficientnet" / "checkpoint" / "structure.json").exists()
    progress = json.loads((run / "prune_test_efficientnet" / "progress.json").read_text())  # for selftrain status
    assert (progress["unit"], progress["step"], progress["total"]) == ("pruning step", 1, 1)
    table = json.loads((run / "export" / "metrics.json").read_text())
    rows = {(r["model"], r["runtime"], r["precision"]) for r in table["rows"]}
    for model in ("teacher", STAGE, "prune_test_efficientnet"):
        assert {(model, "pytorch", "fp32"), (model, "onnxruntime", "fp32"), (model, "onnxruntime", "int8")} <= rows
    for row in table["rows"]:
        if row["runtime"] == "onnxruntime" and row["precision"] == "fp32":
            assert row["max_abs_logit_diff_vs_torch"] < 1e-3 and row["top1_agreement_vs_torch"] == 1.0
        assert 0 <= row["top1"] <= 1 and row["batch1_ms"] > 0 and row["macs"] > 0
        if row["precision"] == "int8":  # shipped only when it agrees with its fp32 model (else named, deleted)
            attempts = row["quantization"]["check"]["attempts"]
            agrees = max(a["agreement_with_fp32"] for a in attempts) >= row["quantization"]["check"]["min_agreement"]
            assert agrees == ("rejected" not in row) == ("path" in row)
            assert (run / "export" / f"{row['model']}.int8.onnx").exists() == agrees
    kept = {r["model"] for r in table["rows"] if r["precision"] == "int8" and "rejected" not in r}
    assert {r["model"] for r in table["int8_vs_fp32"]} == kept  # every kept int8 model's speed against fp32
    deployment = (run / "export" / "deployment.md").read_text()
    assert all(f"- {model}: int8 / fp32 speed" in deployment for model in kept)
    assert (run / "export" / "pareto.png").exists() and "## Deployment" in (run / "report" / "report.md").read_text()
    for row in table["rows"]:
        if "path" in row:  # the size of the file as shipped (the int8 one after its metadata was embedded)
            assert row["file_bytes"] == Path(row["path"]).stat().st_size, row["path"]
    assert "| teacher (teacher) |" in deployment and "agrees with the distillation teacher %" in deployment
    assert deployment.startswith("Test top-1, ECE and agreement on 64 of the 200 test images")  # eval_images
    report = (run / "report" / "report.md").read_text()
    assert "batch-1 budget (onnxruntime)" in report and ("Best under the" in report or "No model meets" in report)
    assert all(r["label"] == f"{r['model']} {r['runtime']} {r['precision']}" for r in table["rows"])
    assert set(pruned["torch_latency_before"]) == {"batch1_ms", "batch64_img_s"}  # interleaved with after


def test_prune_export_and_predict_end_to_end(tiny_teacher_run, tiny_data, tmp_path, capsys):
    from pipeline.cli import main

    config, run = copy_run(tiny_teacher_run, tmp_path, "compress")
    # int8 guard off: this test predicts with the int8 file of a barely trained student, whose int8
    # model agrees with fp32 on ~55 % of images and would be rejected (test_export tests the guard)
    result = cli(config, run, *COMPRESS, "--set", "distill.export.int8_min_agreement=0",
                 "--set", "distill.train.ema_decay=0.9")  # distill and prune evaluate and keep the average
    assert result.returncode == 0, result.stderr[-3000:]
    check_compressed_run(run)
    for stage in (STAGE, "prune_test_efficientnet"):
        assert json.loads((run / stage / "metrics.json").read_text())["ema"]["decay"] == 0.9
    images = tiny_data / "preview"
    images.mkdir(exist_ok=True)
    from pipeline.data.imageset import load_labeled_split, open_data
    from PIL import Image
    for i, image in enumerate(load_labeled_split(open_data(tiny_data), "test").images[:6]):
        Image.fromarray(image[:, :, 0]).save(images / f"{i}.png")
    tops = []
    for model in (run / STAGE / "checkpoint", run / "export" / f"{STAGE}.onnx",
                  run / "prune_test_efficientnet" / "checkpoint", run / "export" / f"{STAGE}.int8.onnx"):
        assert main(["predict", str(model), str(images), "--json", "--top-k", "2"]) == 0
        tops.append([json.loads(line)["top"][0]["class"] for line in capsys.readouterr().out.splitlines()])
        assert len(tops[-1]) == 6
    assert tops[0] == tops[1]  # same top-1 from the checkpoint and its ONNX export
    moved = tmp_path / "moved"  # a finished run copied elsewhere is still done, every stage of it
    shutil.copytree(run, moved)
    again = cli(config, moved, *COMPRESS, "--set", "distill.export.int8_min_agreement=0",
                "--set", "distill.train.ema_decay=0.9")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done already" in again.stdout and "prune_test_efficientnet] done already" in again.stdout
    record_as_made_before(moved / "prune_test_efficientnet",  # before init was relative
                          lambda inputs: inputs["model"].update(init=f"/elsewhere/run/{STAGE}/checkpoint"))
    legacy = cli(config, moved, *COMPRESS, "--set", "distill.export.int8_min_agreement=0",
                 "--set", "distill.train.ema_decay=0.9")
    assert legacy.returncode == 0 and "prune_test_efficientnet] done already" in legacy.stdout, legacy.stderr[-3000:]


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29545"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_distill_prune_export_under_torchrun_and_accelerate_launch(launcher, tiny_teacher_run, tmp_path):
    """The README's two multi-process commands over the distill, prune and export stages."""
    config, run = copy_run(tiny_teacher_run, tmp_path, launcher)
    args = [sys.executable, *LAUNCHERS[launcher],
            "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run)] + set_args(TINY_TEACHER + DISTILL)
    result = subprocess.run(args + COMPRESS, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / STAGE / "metrics.json").read_text())["provenance"]["num_processes"] == 2
    check_compressed_run(run)


def test_mixup_draws_from_the_rows_in_their_order():
    """Seeded from an order-blind sum of the indices, a step that draws the whole pool (the same rows every
    step, permuted) drew the same lambda every step; the draw stays a function of the batch (resumable)."""
    from pipeline.data.loader import Batch
    from pipeline.stages.distill import mixup_view

    n = 64
    identity = torch.eye(n).view(n, 1, 1, n)

    def lam(order: torch.Tensor) -> float:
        batch = Batch(torch.zeros(n, 1, 1, n, dtype=torch.uint8), torch.ones(n, dtype=torch.long), order)
        mixed, _ = mixup_view(identity[order], batch, 1.0)
        return float(mixed.view(n, n)[torch.arange(n), order].median())
    orders = [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    assert len({round(lam(order), 6) for order in orders}) == 4
    assert lam(orders[0]) == lam(orders[0].clone())
