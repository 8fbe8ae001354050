"""Loss algebra pinned on hand-computed numbers (students/losses.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from students.losses import (
    LossBalance,
    distillation_loss,
    hard_cross_entropy,
    kd_loss,
    soft_cross_entropy,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def close(actual: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    assert actual.ndim == 0
    assert actual.item() == pytest.approx(expected, abs=tol, rel=tol)


def batch_2x3() -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: logits 0,0,0 -> softmax 1/3 each. Row 1: logits 0,ln2,0 -> softmax 1/4, 1/2, 1/4."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, LN2, 0.0]], requires_grad=True)
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
    return logits, targets


# Row 0: -(0.5 ln 1/3 + 0.5 ln 1/3) = ln 3 = 1.098612
# Row 1: -(0.5 ln 1/4 + 0.25 ln 1/2 + 0.25 ln 1/4) = (1 + 0.25 + 0.5) ln 2 = 1.75 ln 2 = 1.213008
ROW0, ROW1 = LN3, 1.75 * LN2


# --- soft / hard cross-entropy -------------------------------------------------------------

def test_soft_ce_hand_computed() -> None:
    logits, targets = batch_2x3()
    close(soft_cross_entropy(logits, targets), (ROW0 + ROW1) / 2)  # 1.155810
    close(soft_cross_entropy(logits, targets), 1.155810, tol=1e-5)


def test_soft_ce_gradient_is_softmax_minus_target_over_batch() -> None:
    logits, targets = batch_2x3()
    soft_cross_entropy(logits, targets).backward()
    expected = torch.tensor([[1 / 3 - 0.5, 1 / 3 - 0.5, 1 / 3], [0.25 - 0.5, 0.5 - 0.25, 0.0]]) / 2
    torch.testing.assert_close(logits.grad, expected)


def test_soft_ce_weights() -> None:
    logits, targets = batch_2x3()
    close(soft_cross_entropy(logits, targets, torch.tensor([1.0, 3.0])), (ROW0 + 3 * ROW1) / 4)
    close(soft_cross_entropy(logits, targets, torch.tensor([0.0, 2.0])), ROW1)
    close(soft_cross_entropy(logits, targets, torch.tensor([5.0, 0.0])), ROW0)


def test_soft_ce_zero_weight_row_with_infinite_loss_is_ignored() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, LN2, float("-inf")]], requires_grad=True)
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # row 1: -log 0 = inf
    loss = soft_cross_entropy(logits, targets, torch.tensor([1.0, 0.0]))
    close(loss, ROW0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[1], torch.zeros(3))


def test_soft_ce_all_zero_weights_give_zero_and_finite_grad() -> None:
    logits, targets = batch_2x3()
    loss = soft_cross_entropy(logits, targets, torch.zeros(2))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_soft_ce_equals_hard_ce_on_one_hot() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 1, 2])
    one_hot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), hard_cross_entropy(logits, labels))
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0])
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot, w), hard_cross_entropy(logits, labels, weights=w))


def test_hard_ce_label_smoothing_hand_computed_and_matches_torch() -> None:
    # logits 0,ln2,0 (softmax 1/4,1/2,1/4), label 1, smoothing 0.3 -> target 0.1, 0.8, 0.1:
    # -(0.1 ln 1/4 + 0.8 ln 1/2 + 0.1 ln 1/4) = (0.2 + 0.8 + 0.2) ln 2 = 1.2 ln 2 = 0.831777
    logits = torch.tensor([[0.0, LN2, 0.0]])
    close(hard_cross_entropy(logits, torch.tensor([1]), label_smoothing=0.3), 1.2 * LN2)

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=g)
    labels = torch.tensor([0, 9, 3, 3, 5, 7])
    for ls in (0.0, 0.1, 0.4):
        torch.testing.assert_close(hard_cross_entropy(logits, labels, label_smoothing=ls),
                                   F.cross_entropy(logits, labels, label_smoothing=ls))


def test_hard_ce_weights_are_a_weighted_mean_of_torch_per_row() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, generator=g)
    labels = torch.tensor([4, 0, 2])
    per_row = F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
    loss = hard_cross_entropy(logits, labels, 0.1, weights=torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(loss, (2 * per_row[0] + per_row[2]) / 3)


def test_cross_entropy_validation() -> None:
    logits, targets = batch_2x3()
    with pytest.raises(ValueError, match="targets"):
        soft_cross_entropy(logits, targets[:, :2])
    with pytest.raises(ValueError, match="logits"):
        soft_cross_entropy(logits[0], targets[0])
    with pytest.raises(ValueError, match="weights"):
        soft_cross_entropy(logits, targets, torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        soft_cross_entropy(logits, targets, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="labels"):
        hard_cross_entropy(logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        hard_cross_entropy(logits, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="labels"):
        hard_cross_entropy(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        hard_cross_entropy(logits, torch.tensor([0, 1]), label_smoothing=1.0)


def test_empty_batch_gives_zero_not_nan() -> None:
    logits = torch.zeros(0, 3, requires_grad=True)
    loss = soft_cross_entropy(logits, torch.zeros(0, 3)) + hard_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


# --- LossBalance ----------------------------------------------------------------------------

def test_balance_disabled_is_plain_weighted_sum() -> None:
    balance = LossBalance(ratio_a=2.5, enabled=False)
    for h, p in ((1.0, 4.0), (0.3, 7.0)):
        out = balance(torch.tensor(h), torch.tensor(p))
        close(out["loss"], h + 2.5 * p)
        close(out["pseudo_scale"], 2.5)
        close(out["loss_labeled"], h)
        close(out["loss_pseudo"], p)
    assert balance.state_dict()["steps"] == 0


# a = 3, momentum 0.75: step weight max(1/t, 0.25), so steps 1-4 are a cumulative mean.
# t  (h, p)  avg_h                 avg_p                 ratio  loss = (h + 3 r p) / 4       scale 3r/4
# 1  (2, 4)  2                     4                     0.5    (2 + 6) / 4 = 2              0.375
# 2  (4, 2)  3                     3                     1      (4 + 6) / 4 = 2.5            0.75
# 3  (3, 6)  3                     4                     0.75   (3 + 13.5) / 4 = 4.125       0.5625
# 4  (3, 4)  3                     4                     0.75   (3 + 9) / 4 = 3              0.5625
# 5  (6, 8)  3 + (6-3)/4 = 3.75    4 + (8-4)/4 = 5       0.75   (6 + 18) / 4 = 6             0.5625
# 6  (1, 1)  3.75 - 2.75/4 = 3.0625  5 - 4/4 = 4         0.765625 (1 + 2.296875)/4 = 0.82421875  0.57421875
SEQUENCE = [(2.0, 4.0), (4.0, 2.0), (3.0, 6.0), (3.0, 4.0), (6.0, 8.0), (1.0, 1.0)]
EXPECTED = [  # (avg_h, avg_p, loss, scale)
    (2.0, 4.0, 2.0, 0.375),
    (3.0, 3.0, 2.5, 0.75),
    (3.0, 4.0, 4.125, 0.5625),
    (3.0, 4.0, 3.0, 0.5625),
    (3.75, 5.0, 6.0, 0.5625),
    (3.0625, 4.0, 0.82421875, 0.57421875),
]


def test_balance_enabled_hand_sequence() -> None:
    balance = LossBalance(ratio_a=3.0, enabled=True, momentum=0.75)
    for (h, p), (avg_h, avg_p, loss, scale) in zip(SEQUENCE, EXPECTED):
        out = balance(torch.tensor(h), torch.tensor(p))
        assert balance.avg_labeled == pytest.approx(avg_h)
        assert balance.avg_pseudo == pytest.approx(avg_p)
        close(out["loss"], loss)
        close(out["pseudo_scale"], scale)
    assert balance.steps == 6


def test_balance_gradient_flows_but_scale_is_detached() -> None:
    # Step 1: ratio = L_h / L_p. Were it not detached, a * (L_h / L_p) * L_p = a * L_h would
    # give dL/dL_p = 0 and dL/dL_h = 1; detached it is scale and 1 / (1 + a).
    balance = LossBalance(ratio_a=3.0, enabled=True, momentum=0.75)
    loss_h = torch.tensor(2.0, requires_grad=True)
    loss_p = torch.tensor(4.0, requires_grad=True)
    out = balance(loss_h, loss_p)
    out["loss"].backward()
    assert float(loss_h.grad) == pytest.approx(0.25)
    assert float(loss_p.grad) == pytest.approx(0.375)
    assert not out["pseudo_scale"].requires_grad
    assert out["loss_labeled"] is loss_h and out["loss_pseudo"] is loss_p


def test_balance_state_round_trip_through_json() -> None:
    original = LossBalance(ratio_a=3.0, enabled=True, momentum=0.75)
    for h, p in SEQUENCE[:4]:
        original(torch.tensor(h), torch.tensor(p))
    state = json.loads(json.dumps(original.state_dict()))
    resumed = LossBalance(ratio_a=3.0, enabled=True, momentum=0.75)
    resumed.load_state_dict(state)
    for h, p in SEQUENCE[4:]:
        a = original(torch.tensor(h), torch.tensor(p))
        b = resumed(torch.tensor(h), torch.tensor(p))
        assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["pseudo_scale"], b["pseudo_scale"])
    close(b["loss"], EXPECTED[-1][2])
    assert resumed.state_dict() == original.state_dict()


def test_balance_non_finite_step_does_not_poison_the_averages() -> None:
    balance = LossBalance(ratio_a=1.0, enabled=True, momentum=0.5)
    balance(torch.tensor(2.0), torch.tensor(4.0))
    out = balance(torch.tensor(float("nan")), torch.tensor(1.0))
    assert math.isnan(float(out["loss"]))
    assert balance.state_dict() == {"steps": 1, "avg_labeled": 2.0, "avg_pseudo": 4.0}
    close(balance(torch.tensor(2.0), torch.tensor(4.0))["pseudo_scale"], 0.25)


def test_balance_validation() -> None:
    with pytest.raises(ValueError, match="ratio_a"):
        LossBalance(ratio_a=-1.0, enabled=True)
    with pytest.raises(ValueError, match="momentum"):
        LossBalance(ratio_a=1.0, enabled=True, momentum=1.0)
    balance = LossBalance(ratio_a=1.0, enabled=True)
    with pytest.raises(ValueError, match="loss_p"):
        balance(torch.tensor(1.0), torch.ones(2))
    with pytest.raises(ValueError, match="keys"):
        balance.load_state_dict({"steps": 1, "avg_labeled": 1.0})
    with pytest.raises(ValueError, match="steps"):
        balance.load_state_dict({"steps": 1.5, "avg_labeled": 1.0, "avg_pseudo": 1.0})
    with pytest.raises(ValueError, match="avg_pseudo"):
        balance.load_state_dict({"steps": 1, "avg_labeled": 1.0, "avg_pseudo": float("nan")})


# --- knowledge distillation -----------------------------------------------------------------

def test_kd_zero_when_student_equals_teacher() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 6, generator=g)
    for t in (1.0, 4.0):
        assert abs(float(kd_loss(z, z.clone(), t))) < 1e-6


def test_kd_hand_computed_with_t_squared() -> None:
    # T = 2. Row 0: teacher 0,2ln2,0 -> /T -> softmax 1/4,1/2,1/4; student 0,0,0 -> 1/3 each.
    # KL = 2 * 1/4 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8) = 0.0588915; times T^2 = 2 ln(9/8).
    # Row 1: student == teacher, KL 0. batchmean over 2 rows: ln(9/8) = 0.1177830.
    teacher = torch.tensor([[0.0, 2 * LN2, 0.0], [1.0, -1.0, 0.5]])
    student = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    close(kd_loss(student, teacher, 2.0), math.log(9 / 8))
    close(kd_loss(student, teacher, 2.0, reduction="sum"), 2 * math.log(9 / 8))
    per_row = kd_loss(student, teacher, 2.0, reduction="none")
    torch.testing.assert_close(per_row, torch.tensor([2 * math.log(9 / 8), 0.0]))
    # At T = 1 the same teacher row is 0, 2ln2, 0 -> 1/6, 2/3, 1/6:
    # KL = 2 * 1/6 ln(1/2) + 2/3 ln 2 = 1/3 ln 2; no T^2 factor (T^2 = 1).
    close(kd_loss(student[:1], teacher[:1], 1.0), LN2 / 3)


def test_kd_teacher_is_detached() -> None:
    student = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    kd_loss(student, teacher, 4.0).backward()
    assert teacher.grad is None and student.grad is not None


def _kd_grad(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    z = student.clone().requires_grad_(True)
    kd_loss(z, teacher, t).backward()
    return z.grad


def test_kd_gradient_scale_is_comparable_across_temperatures() -> None:
    g = torch.Generator().manual_seed(4)
    student = torch.randn(8, 10, generator=g)
    teacher = torch.randn(8, 10, generator=g) * 2
    n4 = _kd_grad(student, teacher, 4.0).norm()
    n8 = _kd_grad(student, teacher, 8.0).norm()
    assert 1 / 1.5 < float(n8 / n4) < 1.5
    # Without T^2 the gradient would shrink by (8/4)^2 * (n8 / n4), i.e. about 4x.
    assert float((n8 / 64) / (n4 / 16)) < 0.4
    # Large-T limit: grad = T (p_s - p_t) / B -> (d - mean_c d) / (C B), with d = z_s - z_t.
    # (float64: in float32 p_s - p_t loses digits at T = 1000.)
    student, teacher = student.double(), teacher.double()
    d = student - teacher
    limit = (d - d.mean(dim=1, keepdim=True)) / (10 * 8)
    # The error is O(1/T): under 1% of the largest entry at T = 1000.
    atol = 0.01 * float(limit.abs().max())
    torch.testing.assert_close(_kd_grad(student, teacher, 1000.0), limit, atol=atol, rtol=0.0)


def test_kd_validation() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(z, z, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(z, z, 1.0, reduction="mean")
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(z, torch.zeros(2, 4), 1.0)


def test_distillation_alpha_beta_exact() -> None:
    # Row 0 of the KD case, label 1. CE at T=1 of student 0,0,0 is ln 3; KD (T=2) is 2 ln(9/8).
    student = torch.tensor([[0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2 * LN2, 0.0]])
    out = distillation_loss(student, teacher, torch.tensor([1]), temperature=2.0, alpha=0.3, beta=0.7)
    close(out["loss_ce"], LN3)
    close(out["loss_kd"], 2 * math.log(9 / 8))
    close(out["loss"], 0.3 * LN3 + 0.7 * 2 * math.log(9 / 8))
    smoothed = distillation_loss(student, teacher, torch.tensor([1]), 2.0, 1.0, 0.0, label_smoothing=0.1)
    close(smoothed["loss"], LN3)  # uniform prediction: smoothing does not change CE


def test_distillation_unlabeled_rows_contribute_only_kd() -> None:
    # Row 0 labeled (label 1, CE ln 3, KD 2 ln(9/8)); row 1 unlabeled and its student logits
    # would give a large CE for any label; KD of row 1 is 0 (student == teacher).
    student = torch.tensor([[0.0, 0.0, 0.0], [5.0, -5.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2 * LN2, 0.0], [5.0, -5.0, 0.0]])
    out = distillation_loss(student, teacher, torch.tensor([1, -1]), temperature=2.0, alpha=1.0, beta=1.0)
    close(out["loss_ce"], LN3)
    close(out["loss_kd"], math.log(9 / 8))
    close(out["loss"], LN3 + math.log(9 / 8))
    out["loss"].backward()
    assert torch.allclose(student.grad[1], torch.zeros(3), atol=1e-7)


def test_distillation_without_labels_is_kd_only() -> None:
    student = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2 * LN2, 0.0]])
    for labels in (None, torch.tensor([-1])):
        out = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.5, beta=2.0)
        assert out["loss_ce"].item() == 0.0
        close(out["loss"], 2.0 * 2 * math.log(9 / 8))
        out["loss"].backward()
        assert torch.isfinite(student.grad).all()


def test_distillation_validation() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(z, z, torch.tensor([0, -2]), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(z, z, torch.tensor([0, 3]), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(z, z, None, 1.0, -1.0, 1.0)


def test_mixture_loss_with_no_labeled_row_is_finite_and_trains_the_pseudo_term():
    import torch

    from students.losses import LossBalance
    from students.mixture import mixture_loss

    logits = torch.randn(4, 3, requires_grad=True)
    is_labeled = torch.zeros(4, dtype=torch.bool)
    targets = torch.softmax(torch.randn(4, 3), 1)
    losses = mixture_loss(logits, is_labeled, torch.zeros(0, dtype=torch.long), targets, 0.1,
                          LossBalance(1.0, False))
    assert torch.isfinite(losses["loss"]) and losses["loss_labeled"].item() == 0.0
    losses["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_distillation_hard_mode_is_ce_on_the_teacher_argmax() -> None:
    import torch
    import torch.nn.functional as F

    from students.losses import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([1, -1, 2, -1, -1, 0])
    out = distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.0, beta=1.0, hard=True)
    torch.testing.assert_close(out["loss"], F.cross_entropy(student, teacher.argmax(1)))
    both = distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.5, beta=2.0, hard=True)
    ce = F.cross_entropy(student[labels >= 0], labels[labels >= 0])
    torch.testing.assert_close(both["loss"], 0.5 * ce + 2.0 * F.cross_entropy(student, teacher.argmax(1)))


def test_losses_never_read_a_device_tensor_back() -> None:
    """On a GPU, reading a tensor's values (label ranges, finite weights) waits for the device every step.
    A meta tensor has no values at all: a loss that reads one back raises, so these stand in for a GPU."""
    from students.mutual import mutual_distillation_loss

    student = torch.empty(6, 4, device="meta", requires_grad=True)
    peer = torch.empty(6, 4, device="meta", requires_grad=True)
    teacher = torch.empty(6, 4, device="meta")
    labels = torch.empty(6, dtype=torch.int64, device="meta")
    for hard in (False, True):
        out = distillation_loss(student, teacher, labels, 2.0, 0.1, 0.9, label_smoothing=0.1, hard=hard)
        assert out["loss"].device.type == "meta"
        out = mutual_distillation_loss(student, peer, teacher, labels, 2.0, 0.1, 0.9, 0.5, 0.0, hard)
        assert all(value.device.type == "meta" for value in out.values())
    targets = torch.empty(6, 4, device="meta")
    weights = torch.empty(6, device="meta")
    assert soft_cross_entropy(student, targets, weights).device.type == "meta"
    assert hard_cross_entropy(student, labels, 0.1, weights).device.type == "meta"
