"""Warm-start a deeper student from a shallower checkpoint of the same family (resnet18 -> resnet34).

Noisy Student wants a student equal to or larger than its teacher, and on this project's small
data the student gained only when it started from the teacher's weights (README, Measured).
timm's ResNets zero the last BatchNorm of every residual block (`zero_init_last`), so a fresh
block computes the identity: copying the teacher's tensors into the blocks that share their names
and leaving the extra blocks fresh gives a larger model that starts as exactly the teacher's
function. That is checked on a probe batch,
so an architecture pair where it does not hold is refused instead of silently starting elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from teachers.checkpoint import CheckpointError, CheckpointMeta, read_weights
from teachers.models import create_model

# Largest logit difference accepted between the teacher and the grown student (fp32 round-off of
# a few dozen extra additions of exact zeros is far below this).
FUNCTION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Growth:
    source_arch: str  # the checkpoint's architecture
    loaded: int  # tensors copied from the checkpoint
    fresh: int  # tensors of the larger model left at their initialisation
    max_logit_diff: float  # teacher vs grown student on the probe batch, eval mode


def grow_from(model: torch.nn.Module, directory: Path, meta: CheckpointMeta) -> Growth:
    """Copy a smaller checkpoint into `model` and check the result computes the checkpoint's function."""
    where = f"model.init {directory}"
    source = read_weights(directory)
    target = model.state_dict()
    absent = [k for k in source if k not in target]
    if absent:
        raise CheckpointError(f"{where}: cannot grow '{meta.arch}' into this model: {len(absent)} of its tensors "
                              f"have no counterpart (e.g. {absent[:3]}); only a deeper model of the same family "
                              "(resnet18 -> resnet34) can start from it")
    reshaped = [k for k, v in source.items() if v.shape != target[k].shape]
    if reshaped:
        k = reshaped[0]
        raise CheckpointError(f"{where}: cannot grow '{meta.arch}' into this model: {len(reshaped)} tensors differ "
                              f"in shape (e.g. {k}: {tuple(source[k].shape)} vs {tuple(target[k].shape)})")
    model.load_state_dict(source, strict=False)
    diff = _max_logit_diff(model, source, meta)
    if diff > FUNCTION_TOLERANCE:
        raise CheckpointError(f"{where}: '{meta.arch}' weights fit this model, but the grown model does not compute "
                              f"the checkpoint's function (largest logit difference {diff:.3g}); its extra blocks "
                              "must start as the identity (timm ResNets do: zero_init_last)")
    return Growth(source_arch=meta.arch, loaded=len(source), fresh=len(target) - len(source), max_logit_diff=diff)


@torch.no_grad()
def _max_logit_diff(model: torch.nn.Module, source: dict[str, torch.Tensor], meta: CheckpointMeta) -> float:
    with torch.random.fork_rng(devices=[]):  # building the teacher must not move the training's RNG
        teacher = create_model(meta.arch, meta.num_classes, meta.in_chans)
    teacher.load_state_dict(source)
    probe = torch.randn(4, meta.in_chans, meta.input_size, meta.input_size,
                        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        return (model(probe) - teacher.eval()(probe)).abs().max().item()
    finally:
        model.train(was_training)
