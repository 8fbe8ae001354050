"""The distillation teacher as the student sees it: one checkpoint on the student's view (resized to
its own input size, its own normalisation, no_grad), or several averaged (`distill.ensemble`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from teachers.checkpoint import CheckpointMeta


class TeacherView:
    """The teacher on the student's view: resized to its input size, its own normalisation, no_grad."""

    def __init__(self, model: torch.nn.Module, meta: CheckpointMeta, device: torch.device, channels_last: bool):
        self.model = model.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.size, self.device, self.channels_last = meta.input_size, device, channels_last
        self.mean = torch.tensor(meta.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(meta.std, device=device).view(1, -1, 1, 1)

    @torch.no_grad()
    def __call__(self, view01: torch.Tensor) -> torch.Tensor:
        """`view01`: float NCHW in [0, 1] at the student's size."""
        x = view01
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - self.mean) / self.std).contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return self.model(x).float()


def mean_softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is the mean of the members' softmaxes at it: `logits` is
    (members, N, C); returns T * log(mean_i softmax(z_i / T)), so the KD loss, its argmax (`hard`) and
    the agreement figures read an ensemble like one teacher."""
    log_mean = torch.logsumexp(F.log_softmax(logits.float() / temperature, dim=-1), dim=0) - math.log(len(logits))
    return temperature * log_mean


class EnsembleTeacher:
    """Several teachers on the same view, each at its own size and normalisation (:class:`TeacherView`),
    taught as one: the mean of their softened outputs (:func:`mean_softened`)."""

    def __init__(self, members: list[TeacherView], temperature: float) -> None:
        self.members, self.temperature = members, temperature

    @torch.no_grad()
    def __call__(self, view01: torch.Tensor) -> torch.Tensor:
        return mean_softened(torch.stack([member(view01) for member in self.members]), self.temperature)
