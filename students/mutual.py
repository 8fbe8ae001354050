"""Deep mutual learning (Zhang et al. 2018): two students trained together on the same batch.

Each student's loss is its own distillation loss from the teacher plus ``weight * T^2 *
KL(peer_T || student_T)`` with the peer's logits detached, so each learns from the other and the
gradients of the two students never mix. The pair is one module so that the resumable training
loop (one optimizer, one saved state) trains both; with disjoint parameters and a summed loss,
SGD and AdamW update each student exactly as two separate optimizers with these settings would.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from students.losses import distillation_loss, kd_loss


class MutualPair(torch.nn.Module):
    """`student` and `peer` on one input; forward returns both logits."""

    def __init__(self, student: torch.nn.Module, peer: torch.nn.Module):
        super().__init__()
        self.student, self.peer = student, peer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.student(x), self.peer(x)


def mutual_distillation_loss(student_logits: Tensor, peer_logits: Tensor, teacher_logits: Tensor,
                             labels: Tensor | None, temperature: float, alpha: float, beta: float,
                             weight: float, label_smoothing: float = 0.0, hard: bool = False) -> dict[str, Tensor]:
    """Both students' losses summed in "loss"; the student's terms as in `distillation_loss`,
    "loss_mutual" its KL from the peer, and the peer's own terms under "peer_*"."""
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be finite and >= 0, got {weight}")
    own = distillation_loss(student_logits, teacher_logits, labels, temperature, alpha, beta, label_smoothing, hard)
    peer = distillation_loss(peer_logits, teacher_logits, labels, temperature, alpha, beta, label_smoothing, hard)
    own_mutual = kd_loss(student_logits, peer_logits, temperature)  # kd_loss detaches its target
    peer_mutual = kd_loss(peer_logits, student_logits, temperature)
    total = own["loss"] + weight * own_mutual + peer["loss"] + weight * peer_mutual
    return {"loss": total, "loss_ce": own["loss_ce"], "loss_kd": own["loss_kd"], "loss_mutual": own_mutual,
            "peer_loss_ce": peer["loss_ce"], "peer_loss_kd": peer["loss_kd"], "peer_loss_mutual": peer_mutual}
