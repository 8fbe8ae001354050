"""Checkpoints: safetensors weights + meta.json (architecture and preprocessing travel with the weights).

The weights load into `timm.create_model(meta["arch"], num_classes=..., in_chans=...)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from pipeline.core.atomic import read_json, sha256_file, write_bytes, write_json
from teachers.models import create_model

WEIGHTS = "model.safetensors"
META = "meta.json"
FORMAT = "selftrain-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not fit what it is loaded into."""


@dataclass(frozen=True)
class CheckpointMeta:
    arch: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    config_hash: str
    lineage: dict = field(default_factory=dict)  # what made it: stage, data hash, teacher hash
    format: str = FORMAT


def save_checkpoint(directory: Path, model: torch.nn.Module, meta: CheckpointMeta) -> str:
    """Write weights then meta.json (last, atomically); returns the weights' sha256."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_bytes(directory / WEIGHTS, save(state, metadata={"arch": meta.arch, "format": FORMAT}))
    digest = sha256_file(directory / WEIGHTS)
    write_json(directory / META, {**asdict(meta), "weights_sha256": digest})
    return digest


def read_meta(directory: Path) -> CheckpointMeta:
    path = Path(directory) / META
    if not path.exists():
        raise CheckpointError(f"{directory}: not a checkpoint (no {META})")
    raw = read_json(path)
    raw.pop("weights_sha256", None)
    try:
        meta = CheckpointMeta(**raw)
    except TypeError as exc:
        raise CheckpointError(f"{path}: malformed checkpoint metadata ({exc})") from None
    return CheckpointMeta(**{**asdict(meta), "mean": tuple(meta.mean), "std": tuple(meta.std),
                             "class_names": tuple(meta.class_names)})


def checkpoint_hash(directory: Path) -> str:
    return read_json(Path(directory) / META).get("weights_sha256", "")


def check_compatible(meta: CheckpointMeta, arch: str | None, num_classes: int | None,
                     where: str) -> None:
    """Refuse a checkpoint whose architecture or class count differs from what is expected."""
    if arch is not None and meta.arch != arch:
        raise CheckpointError(f"{where}: checkpoint architecture is '{meta.arch}', but '{arch}' was asked for")
    if num_classes is not None and meta.num_classes != num_classes:
        raise CheckpointError(f"{where}: checkpoint has {meta.num_classes} classes, the data has {num_classes}")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None


def load_weights_into(model: torch.nn.Module, directory: Path) -> None:
    path = Path(directory) / WEIGHTS
    state = read_weights(directory)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_checkpoint(directory: Path, arch: str | None = None, num_classes: int | None = None,
                    drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Build the timm model the checkpoint describes and load its weights."""
    meta = read_meta(directory)
    check_compatible(meta, arch, num_classes, str(directory))
    model = create_model(meta.arch, meta.num_classes, meta.in_chans, drop_rate, drop_path_rate)
    load_weights_into(model, directory)
    return model, meta
