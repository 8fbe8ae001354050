"""Which parts of a model torch-pruning traces, and which layers keep their output width.

Most models are one part: the whole model, with only the classifier's outputs kept (the class count).

torchvision's ShuffleNet V2 is not: its channel shuffle (a 5-d view and a transpose) interleaves the
two branches of every block, so the channels between blocks are a permutation torch-pruning's
dependency graph cannot map, and tracing the whole model fails. The channels *inside* each block's
second branch never pass through a shuffle (1x1 conv -> BN -> depthwise 3x3 -> BN -> 1x1 conv), and
neither do the 1,024 channels of the last 1x1 conv before the classifier. So ShuffleNet V2 is pruned
as those parts, each traced on its own with the input it sees in the whole model: a branch's last
1x1 conv keeps its outputs (they enter the shuffle), and so does the classifier. Those parts hold
73 % (branches) + 16 % (last conv) of shufflenet_v2_x1_0's convolution MACs at 64 px; the stem and
the channels between blocks are left whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2


class PruneError(ValueError):
    """Pruning cannot reach its target, or a pruned checkpoint is missing or malformed."""


@dataclass
class PrunePart:
    """A module torch-pruning traces on its own, the input it sees, and layers whose outputs stay whole.
    Pruning the part's layers prunes the model: they are the model's own modules, not copies."""
    module: nn.Module
    example_input: torch.Tensor
    ignored: list[nn.Module]


class _ShuffleNetTail(nn.Module):
    """ShuffleNetV2's forward after the last stage (conv5, global mean, fc), as a module to trace."""

    def __init__(self, conv5: nn.Module, fc: nn.Linear):
        super().__init__()
        self.conv5, self.fc = conv5, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv5(x).mean([2, 3]))


def _last_linear(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.Linear):
        return module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels are never pruned: the classifier, so the class count stays.

    timm: `model.get_classifier()` (none when num_classes=0); torchvision and others: the last Linear
    of `fc`, `classifier` or `head`, else the model's last Linear."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return [head]
        if isinstance(head, nn.Module):
            return []
    for name in ("fc", "classifier", "head"):
        found = _last_linear(getattr(model, name)) if isinstance(getattr(model, name, None), nn.Module) else None
        if found is not None:
            return [found]
    found = _last_linear(model)
    if found is None:
        raise PruneError(f"{type(model).__name__}: no classifier found (no get_classifier, fc, classifier or Linear)")
    return [found]


def _inputs_seen(model: nn.Module, modules: dict[str, nn.Module], example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named module receives in one eval forward of `example_input`."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda _m, args, key=key: seen.__setitem__(key, args[0].detach()))
             for key, module in modules.items()]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _shufflenet_parts(model: ShuffleNetV2, example_input: torch.Tensor) -> list[PrunePart]:
    branches = {name: block.branch2 for name, block in model.named_modules() if isinstance(block, InvertedResidual)}
    seen = _inputs_seen(model, {**branches, "conv5": model.conv5}, example_input)
    parts = [PrunePart(branch, seen[name], [branch[5]]) for name, branch in branches.items()]
    return [*parts, PrunePart(_ShuffleNetTail(model.conv5, model.fc), seen["conv5"], [model.fc])]


def prune_parts(model: nn.Module, example_input: torch.Tensor) -> list[PrunePart]:
    """The parts to prune: ShuffleNet V2's branches and tail (module docstring), else the whole model."""
    if isinstance(model, ShuffleNetV2):
        return _shufflenet_parts(model, example_input)
    return [PrunePart(model, example_input, classifier_layers(model))]
