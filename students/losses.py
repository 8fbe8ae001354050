"""Loss algebra for the student stages: soft/hard cross-entropy, Zoph et al. loss balance, KD.

Pure functions over logits; no models, no I/O. Every function returns a scalar tensor (or a
dict of them, the "loss dict" the trainer logs) that stays in the autograd graph.

Conventions shared by the cross-entropies:
- ``weights`` (B,) gives a weighted mean ``sum(w * l) / sum(w)``; rows with weight 0 contribute
  nothing (even if their loss is not finite) and all-zero weights give 0 with a zero gradient.
- An empty batch (B = 0) gives 0 rather than NaN, so a step whose labeled part is empty still
  backpropagates the other terms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_LABEL",
    "LossBalance",
    "distillation_loss",
    "hard_cross_entropy",
    "kd_loss",
    "soft_cross_entropy",
]

IGNORE_LABEL = -1
"""Label value marking an unlabeled row in :func:`distillation_loss`."""

_KD_REDUCTIONS = ("batchmean", "sum", "none")


def _check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a (B, C) tensor, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")


def _values_readable(tensor: Tensor) -> bool:
    """Value checks (ranges, finiteness) read the tensor back, which on an accelerator waits for the
    device every step (2-8 waits a distillation step); they run on CPU tensors only. On a GPU an
    out-of-range label still stops the run, by the loss kernel's own device-side assert."""
    return tensor.device.type == "cpu"


def _check_weights(weights: Tensor | None, batch: int) -> None:
    if weights is None:
        return
    if not isinstance(weights, Tensor) or tuple(weights.shape) != (batch,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a ({batch},) tensor, got {shape}")
    if not _values_readable(weights):
        return
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite and >= 0")


def _check_labels(labels: Tensor, batch: int, classes: int, allow_ignore: bool = False) -> None:
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (batch,):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a ({batch},) tensor, got {shape}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class ids, got {labels.dtype}")
    if batch == 0 or not _values_readable(labels):
        return
    low = IGNORE_LABEL if allow_ignore else 0
    lo, hi = int(labels.min()), int(labels.max())
    if lo < low or hi >= classes:
        allowed = f"[0, {classes}) or {IGNORE_LABEL}" if allow_ignore else f"[0, {classes})"
        raise ValueError(f"labels must be in {allowed}, got range [{lo}, {hi}]")


def _reduce(per_row: Tensor, weights: Tensor | None, anchor: Tensor) -> Tensor:
    """Mean (or weighted mean) of per-row losses; ``anchor`` keeps a 0 result in the graph."""
    if per_row.numel() == 0:
        return anchor.sum() * 0.0
    if weights is None:
        return per_row.mean()
    w = weights.to(per_row.dtype)
    # where() rather than w * l so that a zero-weight row with an inf/NaN loss contributes 0.
    numerator = torch.where(w > 0, w * per_row, torch.zeros_like(per_row)).sum()
    denominator = w.sum()
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def soft_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over rows of ``-sum_c t_c * log_softmax(z)_c`` for probability targets (B, C).

    Targets are not checked to sum to 1 (that would force a device sync each step); the
    pseudo-label stage guarantees it.
    """
    _check_logits(logits)
    if not isinstance(targets, Tensor) or targets.shape != logits.shape:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must have the logits' shape {tuple(logits.shape)}, got {shape}")
    _check_weights(weights, logits.shape[0])
    per_row = -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1)
    return _reduce(per_row, weights, logits)


def hard_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    label_smoothing: float = 0.0,
    weights: Tensor | None = None,
) -> Tensor:
    """``F.cross_entropy(logits, labels, label_smoothing=...)`` with optional row weights."""
    _check_logits(logits)
    _check_labels(labels, logits.shape[0], logits.shape[1])
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    _check_weights(weights, logits.shape[0])
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if weights is None:  # torch's own mean: bit-identical to a plain F.cross_entropy call
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    per_row = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    return _reduce(per_row, weights, logits)


class LossBalance:
    """Combine the human-label loss L_h and the pseudo-label loss L_p.

    ``enabled=False``: ``L = L_h + a * L_p`` (Noisy Student, a = weight of the unlabeled loss).

    ``enabled=True``: the loss normalisation of Zoph et al. 2020 ("Rethinking Pre-training and
    Self-training", Sec. 3), ``L = (L_h + a * (avg(L_h) / avg(L_p)) * L_p) / (1 + a)``, which
    keeps the pseudo term at a fixed share of the labeled term whatever their raw scales.

    The paper calls avg "moving averages" without giving a momentum, and its released code
    (tensorflow/tpu ``projects/self_training``) holds configs and checkpoints only, so the
    averaging here is our choice: an exponential moving average with ``momentum`` (0.99, a
    horizon of ~100 steps), whose step weight is ``max(1 / t, 1 - momentum)``: the first
    ``1 / (1 - momentum)`` steps are a plain cumulative mean, which removes the start-up bias of
    an EMA started at 0 (and at step 1 the averages are the current values). The averages are
    updated with the current step's values *before* the ratio is taken, and they are Python
    floats, so no gradient flows through the scale. A step with a non-finite loss does not
    update them (one bad batch cannot poison a resumed run); the previous ratio is used.

    Under data parallelism each process keeps its own averages; pass losses reduced across
    processes if they must agree exactly.
    """

    _EPS = 1e-12

    def __init__(self, ratio_a: float, enabled: bool, momentum: float = 0.99) -> None:
        if not math.isfinite(ratio_a) or ratio_a < 0:
            raise ValueError(f"ratio_a must be finite and >= 0, got {ratio_a}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.ratio_a = float(ratio_a)
        self.enabled = bool(enabled)
        self.momentum = float(momentum)
        self.steps = 0
        self.avg_labeled = 0.0
        self.avg_pseudo = 0.0

    def __repr__(self) -> str:
        return (f"LossBalance(ratio_a={self.ratio_a}, enabled={self.enabled}, "
                f"momentum={self.momentum}, steps={self.steps})")

    @property
    def ratio(self) -> float:
        """avg(L_h) / avg(L_p); 1.0 before the first update."""
        if self.steps == 0:
            return 1.0
        return self.avg_labeled / max(self.avg_pseudo, self._EPS)

    def _update(self, value_h: float, value_p: float) -> None:
        if not (math.isfinite(value_h) and math.isfinite(value_p)):
            return
        self.steps += 1
        w = max(1.0 / self.steps, 1.0 - self.momentum)
        self.avg_labeled += w * (value_h - self.avg_labeled)
        self.avg_pseudo += w * (value_p - self.avg_pseudo)

    def __call__(self, loss_h: Tensor, loss_p: Tensor) -> dict[str, Tensor]:
        for name, value in (("loss_h", loss_h), ("loss_p", loss_p)):
            if not isinstance(value, Tensor) or value.ndim != 0:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a scalar tensor, got {shape}")
        a = self.ratio_a
        if self.enabled:
            self._update(float(loss_h.detach()), float(loss_p.detach()))
            scale = a * self.ratio / (1.0 + a)
            total = loss_h / (1.0 + a) + scale * loss_p
        else:
            scale = a
            total = loss_h + a * loss_p
        return {
            "loss": total,
            "loss_labeled": loss_h,
            "loss_pseudo": loss_p,
            "pseudo_scale": torch.tensor(scale, dtype=loss_p.dtype, device=loss_p.device),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able resume state (for accelerate's ``register_for_checkpointing``)."""
        return {"steps": self.steps, "avg_labeled": self.avg_labeled, "avg_pseudo": self.avg_pseudo}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"steps", "avg_labeled", "avg_pseudo"}
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must have exactly the keys {sorted(expected)}, got {keys}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state['steps'] must be an int >= 0, got {steps!r}")
        averages = {}
        for key in ("avg_labeled", "avg_pseudo"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"state[{key!r}] must be a finite number, got {value!r}")
            averages[key] = float(value)
        self.steps = steps
        self.avg_labeled = averages["avg_labeled"]
        self.avg_pseudo = averages["avg_pseudo"]


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: str = "batchmean",
) -> Tensor:
    """Hinton et al. 2015: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``.

    The T^2 keeps the gradient wrt the student logits on the same scale for every T (it is
    ``T * (p_s - p_t)`` per row, which tends to ``(d - mean(d)) / C`` with ``d = z_s - z_t`` for
    large T). ``reduction``: "batchmean" (sum / B, the true KL mean), "sum", or "none" (per-row,
    shape (B,)). The teacher is detached and cast to the student's dtype (stored logits may be
    half precision).
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} differs from "
                         f"student_logits shape {tuple(student_logits.shape)}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if reduction not in _KD_REDUCTIONS:
        # kl_div's "mean" divides by B * C, which silently shrinks the loss by C.
        raise ValueError(f"reduction must be one of {_KD_REDUCTIONS}, got {reduction!r}")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=1)
    if reduction == "none":
        per_row = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1)
        return per_row * (t * t)
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(log_p_s, log_p_t, reduction=reduction, log_target=True) * (t * t)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float = 0.0,
    hard: bool = False,
) -> dict[str, Tensor]:
    """``alpha * CE(labels, z_s) + beta * kd_loss(z_s, z_t, T)`` as a loss dict.

    ``labels`` None means no row is labeled; a label of ``IGNORE_LABEL`` (-1) marks one
    unlabeled row. CE (at T = 1, with ``label_smoothing``) is the mean over labeled rows only,
    0 when there are none; KD is the mean over all rows. ``hard``: the KD term is CE on the
    teacher's argmax instead (T plays no part here; an ensemble teacher's argmax is that of its members'
    mean softmax at T, pipeline/stages/distill.py). Returns {"loss", "loss_ce", "loss_kd"}.
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if hard:
        loss_kd = hard_cross_entropy(student_logits, teacher_logits.detach().argmax(dim=1))
    else:
        loss_kd = kd_loss(student_logits, teacher_logits, temperature)
    if labels is None:
        loss_ce = student_logits.sum() * 0.0
    else:
        batch, classes = student_logits.shape
        _check_labels(labels, batch, classes, allow_ignore=True)
        has_label = labels != IGNORE_LABEL
        loss_ce = hard_cross_entropy(student_logits, labels.clamp_min(0), label_smoothing,
                                     weights=has_label.to(student_logits.dtype))
    return {"loss": alpha * loss_ce + beta * loss_kd, "loss_ce": loss_ce, "loss_kd": loss_kd}
