"""Model construction: any timm architecture by name (and torchvision's ShuffleNet V2), with its noise settings."""

from __future__ import annotations

import difflib

import timm
import torch
import torchvision


class ModelError(ValueError):
    """An architecture name or model option is not usable."""


# ShuffleNet V2, the course's third efficient family, is not in timm: torchvision's builders, by name.
TORCHVISION_ARCHS = {
    "shufflenet_v2_x0_5": torchvision.models.shufflenet_v2_x0_5,
    "shufflenet_v2_x1_0": torchvision.models.shufflenet_v2_x1_0,
    "shufflenet_v2_x1_5": torchvision.models.shufflenet_v2_x1_5,
    "shufflenet_v2_x2_0": torchvision.models.shufflenet_v2_x2_0,
}


def is_known_arch(arch: str) -> bool:
    return arch in TORCHVISION_ARCHS or timm.is_model(arch)


def _torchvision_model(arch: str, num_classes: int, in_chans: int, drop_rate: float,
                       drop_path_rate: float) -> torch.nn.Module:
    """torchvision's ShuffleNet V2 (random init) with `in_chans` input channels and optional head dropout."""
    if drop_path_rate > 0:
        raise ModelError(f"{arch} has no stochastic depth; set drop_path_rate: 0")
    model = TORCHVISION_ARCHS[arch](weights=None, num_classes=num_classes)
    stem = model.conv1[0]
    if in_chans != stem.in_channels:
        model.conv1[0] = torch.nn.Conv2d(in_chans, stem.out_channels, stem.kernel_size, stem.stride,
                                         stem.padding, bias=False)
    if drop_rate > 0:
        model.fc = torch.nn.Sequential(torch.nn.Dropout(drop_rate), model.fc)
    return model


def check_arch(arch: str) -> None:
    """Raise ModelError naming the closest known names when `arch` is neither a timm model nor a ShuffleNet."""
    if not is_known_arch(arch):
        close = difflib.get_close_matches(arch, timm.list_models() + list(TORCHVISION_ARCHS), n=5, cutoff=0.6)
        raise ModelError(f"unknown timm architecture '{arch}'" + (f"; did you mean {', '.join(close)}?" if close else
                                                                 "; `timm.list_models('*name*')` lists the names"))


def create_model(arch: str, num_classes: int, in_chans: int, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> torch.nn.Module:
    """`timm.create_model` (or torchvision's ShuffleNet V2) with random init; weights never come from a hub."""
    if arch in TORCHVISION_ARCHS:
        return _torchvision_model(arch, num_classes, in_chans, drop_rate, drop_path_rate)
    check_arch(arch)
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, "pretrained": False, "drop_rate": drop_rate}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as exc:
        raise ModelError(f"timm model '{arch}' does not accept these options ({exc}); "
                         "set drop_path_rate: 0 for architectures without stochastic depth") from None
