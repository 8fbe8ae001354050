"""Deep mutual learning: the loss algebra, and the distill stage training a student with its peer."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.config.loading import load_config
from pipeline.engine.predict import load_model
from pipeline.stages.distill import kd_settings
from students.losses import distillation_loss
from students.mutual import MutualPair, mutual_distillation_loss
from conftest import TINY_TEACHER, set_args
from test_distill import DISTILL, STAGE, cli, copy_run, kill_resume_and_compare


def logits(seed: int, rows: int = 6, classes: int = 4) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def test_weight_zero_is_two_independent_distillations():
    s, p, t = logits(0), logits(1), logits(2).detach()
    labels = torch.tensor([0, 1, -1, 3, -1, 2])
    found = mutual_distillation_loss(s, p, t, labels, 2.0, 0.3, 0.7, weight=0.0)
    own = distillation_loss(s, t, labels, 2.0, 0.3, 0.7)
    peer = distillation_loss(p, t, labels, 2.0, 0.3, 0.7)
    torch.testing.assert_close(found["loss"], own["loss"] + peer["loss"])
    torch.testing.assert_close(found["peer_loss_kd"], peer["loss_kd"])


def test_each_student_learns_from_the_other_by_hand():
    """alpha = beta = 0: d loss / d z_s = w * T * (softmax(z_s/T) - softmax(z_p/T)) / B, and the same for the peer."""
    s, p, t = logits(0), logits(1), logits(2).detach()
    w, temp = 0.5, 2.0
    found = mutual_distillation_loss(s, p, t, None, temp, 0.0, 0.0, weight=w)
    found["loss"].backward()
    q_s, q_p = F.softmax(s.detach() / temp, 1), F.softmax(p.detach() / temp, 1)
    torch.testing.assert_close(s.grad, w * temp * (q_s - q_p) / len(s))
    torch.testing.assert_close(p.grad, w * temp * (q_p - q_s) / len(p))
    kl = (q_p * (q_p.log() - q_s.log())).sum(1).mean() * temp ** 2
    torch.testing.assert_close(found["loss_mutual"], kl)


def test_swapping_the_students_swaps_their_terms():
    s, p, t = logits(0), logits(1), logits(2).detach()
    labels = torch.tensor([0, 1, -1, 3, -1, 2])
    a = mutual_distillation_loss(s, p, t, labels, 1.0, 0.1, 0.9, weight=1.0)
    b = mutual_distillation_loss(p, s, t, labels, 1.0, 0.1, 0.9, weight=1.0)
    torch.testing.assert_close(a["loss"], b["loss"])
    for term in ("loss_ce", "loss_kd", "loss_mutual"):
        torch.testing.assert_close(a[term], b["peer_" + term])


def test_negative_weight_refused():
    with pytest.raises(ValueError, match="weight"):
        mutual_distillation_loss(logits(0), logits(1), logits(2), None, 1.0, 0.1, 0.9, weight=-1.0)


def test_pair_runs_both_models_on_one_input():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    out_a, out_b = MutualPair(a, b)(x)
    torch.testing.assert_close(out_a, a(x))
    torch.testing.assert_close(out_b, b(x))


def test_mutual_off_leaves_the_fingerprint_of_earlier_runs_alone():
    # exactly the keys runs made before mutual learning and the streamed pool were fingerprinted with
    assert set(kd_settings(load_config(None, []))) == {"mode", "temperature", "alpha", "beta", "hard", "mixup",
                                                        "labeled_batch"}
    assert kd_settings(load_config(None, ["distill.mutual.weight=1.0"]))["mutual"]["weight"] == 1.0


def test_mutual_distill_trains_a_peer_and_resumes_after_sigkill(tiny_teacher_run, tmp_path):
    mutual = ["--set", "distill.mutual.weight=1.0",
              "--set", "distill.mutual.peer={arch: shufflenet_v2_x0_5, input_size: 24}",
              "--set", "distill.train.ema_decay=0.9"]  # the pair's average: saved, resumed, swapped in
    config, straight = copy_run(tiny_teacher_run, tmp_path, "straight")
    _, killed = copy_run(tiny_teacher_run, tmp_path, "killed")
    result = cli(config, straight, *mutual)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((straight / STAGE / "metrics.json").read_text())
    assert metrics["mutual"]["peer_arch"] == "shufflenet_v2_x0_5" and 0 <= metrics["mutual"]["peer_top1"] <= 1
    assert {"loss_mutual", "peer_loss_kd"} <= set(metrics["final_losses"])
    assert metrics["ema"]["decay"] == 0.9 and 0 <= metrics["ema"]["raw_top1"] <= 1
    model, meta = load_model(straight / STAGE / "peer", 10)  # the peer is a checkpoint like any other
    assert meta.arch == "shufflenet_v2_x0_5" and meta.input_size == 24
    assert json.loads((straight / STAGE / "checkpoint" / "meta.json").read_text())["arch"] == "test_efficientnet"
    kill_resume_and_compare(config, straight, killed, *mutual, parts=("checkpoint", "peer"))


def test_mutual_distill_with_the_streamed_pool_under_torchrun(tiny_teacher_run, tmp_path):
    config, run = copy_run(tiny_teacher_run, tmp_path, "torchrun")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29549",
            "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run), "--only", STAGE]
    args += set_args(TINY_TEACHER + DISTILL + ["distill.mutual.weight=0.5", "distill.pool=streamed"])
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / STAGE / "metrics.json").read_text())
    assert metrics["provenance"]["num_processes"] == 2 and metrics["mutual"]["peer_arch"] == "test_efficientnet"
    assert metrics["pool"] == "streamed" and metrics["num_unlabeled"] == 400
    assert (run / STAGE / "peer" / "model.safetensors").exists()
