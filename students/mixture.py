"""The Noisy Student loss on one mixed batch: human labels plus pseudo-labels.

Pure tensor algebra over the logits of one forward pass: CE with label smoothing on
the labeled rows plus `a` times soft CE on the pseudo-labeled rows, combined by
`LossBalance` (plain weighting or Zoph et al.'s running-average normalisation).
A step whose batch holds no labeled (or no pseudo-labeled) row gives 0 for that
term instead of NaN.
"""

from __future__ import annotations

from torch import Tensor

from students.losses import LossBalance, hard_cross_entropy, soft_cross_entropy


def mixture_loss(logits: Tensor, is_labeled: Tensor, labels: Tensor, targets: Tensor, smoothing: float,
                 balance: LossBalance) -> dict[str, Tensor]:
    """Loss dict for a batch whose rows `is_labeled` have class `labels`, the rest soft `targets`.

    `labels` (L,) and `targets` (B-L, C) are already gathered for the labeled and
    pseudo-labeled rows, in row order.
    """
    loss_h = hard_cross_entropy(logits[is_labeled], labels, label_smoothing=smoothing)
    loss_p = soft_cross_entropy(logits[~is_labeled], targets)
    return balance(loss_h, loss_p)
