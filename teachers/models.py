"""Model construction: any timm architecture by name, with its noise settings."""

from __future__ import annotations

import difflib

import timm
import torch


class ModelError(ValueError):
    """An architecture name or model option is not usable."""


def create_model(arch: str, num_classes: int, in_chans: int, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> torch.nn.Module:
    """`timm.create_model` with random init (weights never come from a hub)."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise ModelError(f"unknown timm architecture '{arch}'" + (f"; did you mean {', '.join(close)}?" if close else
                                                                 "; `timm.list_models('*name*')` lists the names"))
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, "pretrained": False, "drop_rate": drop_rate}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as exc:
        raise ModelError(f"timm model '{arch}' does not accept these options ({exc}); "
                         "set drop_path_rate: 0 for architectures without stochastic depth") from None
