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
    max_output_diff: float  # teacher vs grown student on the probe batch, eval mode (see `compared`)
    head_reinitialised: bool = False  # the checkpoint's head was for other classes (or never trained): left fresh

    @property
    def compared(self) -> str:
        """What the check compared: the logits, or the pooled features when the head is new."""
        return "feature" if self.head_reinitialised else "logit"


def grow_from(model: torch.nn.Module, directory: Path, meta: CheckpointMeta, new_head: frozenset[str] = frozenset()
              ) -> Growth:
    """Copy a smaller checkpoint into `model` and check the result computes the checkpoint's function.
    `new_head`: the model's classifier tensors, when the checkpoint's head is for other classes: they keep
    their initialisation, and the check compares the features the heads read instead of the logits."""
    return grow_state(model, read_weights(directory), meta, new_head, where=f"model.init {directory}")


def grow_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], meta: CheckpointMeta,
               new_head: frozenset[str] = frozenset(), where: str = "model.init") -> Growth:
    """`grow_from` on weights already read (preflight grows a random-init teacher to check the pair early)."""
    source = {k: v for k, v in weights.items() if k not in new_head}
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
    growth = Growth(source_arch=meta.arch, loaded=len(source), fresh=len(target) - len(source),
                    max_output_diff=_max_output_diff(model, source, meta, features=bool(new_head)),
                    head_reinitialised=bool(new_head))
    if growth.max_output_diff > FUNCTION_TOLERANCE:
        raise CheckpointError(f"{where}: '{meta.arch}' weights fit this model, but the grown model does not compute "
                              f"the checkpoint's function (largest {growth.compared} difference "
                              f"{growth.max_output_diff:.3g}); its extra blocks must start as the identity (timm "
                              "ResNets do: zero_init_last)")
    return growth


@torch.no_grad()
def _max_output_diff(model: torch.nn.Module, source: dict[str, torch.Tensor], meta: CheckpointMeta,
                     features: bool) -> float:
    """Grown model vs checkpoint on a probe batch: logits, or the pooled features their heads read."""
    with torch.random.fork_rng(devices=[]):  # building the teacher must not move the training's RNG
        teacher = create_model(meta.arch, meta.num_classes, meta.in_chans)
    teacher.load_state_dict(source, strict=not features)
    probe = torch.randn(4, meta.in_chans, meta.input_size, meta.input_size,
                        generator=torch.Generator().manual_seed(0))

    def output(net: torch.nn.Module) -> torch.Tensor:
        return net.forward_head(net.forward_features(probe), pre_logits=True) if features else net(probe)

    was_training = model.training
    model.eval()
    try:
        return (output(model) - output(teacher.eval())).abs().max().item()
    finally:
        model.train(was_training)
