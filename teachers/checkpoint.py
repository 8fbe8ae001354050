"""Checkpoints: safetensors weights + meta.json (architecture and preprocessing travel with the weights).

The weights load into `timm.create_model(meta["arch"], num_classes=..., in_chans=...)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from timm.models._hub import save_config_for_hf  # the writer behind timm.models.save_for_hf

from pipeline.core.atomic import read_json, sha256_file, write_bytes, write_json
from teachers.models import create_model

WEIGHTS = "model.safetensors"
META = "meta.json"
TIMM_CONFIG = "config.json"  # timm's format: architecture, num_classes, model_args, pretrained_cfg
SOURCE_WEIGHT_FIELDS = ("tag", "hf_hub_id", "url", "origin_url", "paper_ids", "license", "notes")
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


def stable_safetensors(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the metadata keys in sorted order.

    safetensors writes `__metadata__` from a hash map, so the same tensors came out as
    different bytes (and a different sha256) from one process to the next. The header is
    re-serialised with sorted metadata; it has the same length, so offsets do not move.
    """
    blob = save(state, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > size:  # cannot happen for the same content; keep the library's bytes then
        return blob
    return blob[:8] + text.ljust(size, b" ") + blob[8 + size:]


def write_timm_config(directory: Path, model: torch.nn.Module, meta: CheckpointMeta) -> None:
    """timm's own `config.json` (as `timm.models.save_for_hf` writes it), so that
    `timm.create_model("local-dir:DIR", pretrained=True)` rebuilds the model with these weights
    and `timm.data.resolve_data_config` returns the preprocessing it was trained with."""
    data_config = {"input_size": (meta.in_chans, meta.input_size, meta.input_size), "mean": tuple(meta.mean),
                   "std": tuple(meta.std), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    tmp = directory / (TIMM_CONFIG + ".tmp")
    save_config_for_hf(model, str(tmp), model_config={"label_names": list(meta.class_names)},
                       data_config=data_config)
    config = read_json(tmp)
    tmp.unlink()
    for key in SOURCE_WEIGHT_FIELDS:  # they describe timm's published weights, not these
        config["pretrained_cfg"].pop(key, None)
    write_json(directory / TIMM_CONFIG, config)


def save_checkpoint(directory: Path, model: torch.nn.Module, meta: CheckpointMeta, timm_config: bool = True) -> str:
    """Write weights, timm's config.json, then meta.json (last, atomically); returns the weights' sha256.

    `timm_config` False: no config.json (a pruned model, whose widths timm's config cannot describe)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_bytes(directory / WEIGHTS, stable_safetensors(state, {"arch": meta.arch, "format": FORMAT}))
    (directory / TIMM_CONFIG).unlink(missing_ok=True)
    if timm_config and hasattr(model, "pretrained_cfg"):  # timm models; torchvision's ShuffleNet has none
        write_timm_config(directory, model, meta)
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


_HASHED: dict[tuple[str, int, int, int], str] = {}


def _weights_sha256(path: Path) -> str:
    """sha256 of a weights file, once per process while the file is unchanged (same inode, size and mtime):
    preflight, each stage's inputs and the distillation all ask for the teacher's, tens of MB each time."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def checkpoint_hash(directory: Path) -> str:
    """sha256 of the weights file's content (a checkpoint's identity), checked against meta.json.

    Weights swapped under a meta.json that describes others are refused rather than labelled
    with the wrong identity."""
    directory = Path(directory)
    path = directory / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{directory}: not a checkpoint (no {WEIGHTS})")
    digest = _weights_sha256(path)
    recorded = read_json(directory / META).get("weights_sha256")
    if recorded is not None and recorded != digest:
        raise CheckpointError(f"{path}: its sha256 {digest[:12]} differs from the {recorded[:12]} recorded in "
                              f"{directory / META}: the weights file was replaced or damaged after the checkpoint "
                              "was written")
    return digest


def check_compatible(meta: CheckpointMeta, arch: str | None, num_classes: int | None,
                     where: str) -> None:
    """Refuse a checkpoint whose architecture or class count differs from what is expected."""
    if arch is not None and meta.arch != arch:
        raise CheckpointError(f"{where}: checkpoint architecture is '{meta.arch}', but '{arch}' was asked for")
    if num_classes is not None and meta.num_classes != num_classes:
        raise CheckpointError(f"{where}: checkpoint has {meta.num_classes} classes, the data has {num_classes}")


def has_trained_head(meta: CheckpointMeta) -> bool:
    """False for a self-supervised backbone (stage ssl_pretrain): its classifier was never trained."""
    return meta.lineage.get("method") != "simclr"


def check_trained_head(meta: CheckpointMeta, where: str) -> None:
    """Refuse to predict or teach with a self-supervised backbone: its classifier was never trained (its
    outputs are random however good its features are)."""
    if not has_trained_head(meta):
        raise CheckpointError(f"{where} is a SimCLR backbone (stage ssl_pretrain): its classifier was never "
                              "trained, so its predictions are random; start a model from it (model.init: "
                              "ssl_pretrain) and use that model")


def check_same_classes(meta: CheckpointMeta, classes: list[str], where: str) -> None:
    """Refuse a checkpoint whose classes are not the data's, by name and in order: a teacher's logits
    are read by class index, so another order (or other classes of the same count) would teach wrong labels."""
    check_trained_head(meta, where)
    check_compatible(meta, None, len(classes), where)
    names = tuple(meta.class_names)
    if names and len(names) != len(classes):
        raise CheckpointError(f"{where}: meta.json names {len(names)} classes for {meta.num_classes} outputs")
    if names and names != tuple(classes):
        index = next(i for i, (ours, theirs) in enumerate(zip(classes, names)) if ours != theirs)
        raise CheckpointError(f"{where}: class {index} is {names[index]!r} in the checkpoint but "
                              f"{classes[index]!r} in the data; a teacher needs the data's classes in the same order")


def check_teachers_classes(named_dirs: Iterable[tuple[str, str]], classes: list[str]) -> None:
    """`check_same_classes` for each (config key, checkpoint directory) of teachers given by the user."""
    for where, directory in named_dirs:
        check_same_classes(read_meta(Path(directory)), classes, f"{where} ({directory})")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None


def load_weights_into(model: torch.nn.Module, directory: Path) -> None:
    path = Path(directory) / WEIGHTS
    state = read_weights(directory)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong and (Path(directory) / "structure.json").exists():
        raise CheckpointError(f"{directory} is a pruned checkpoint (structure.json): load it with "
                              "pipeline.engine.predict.load_model or students.prune.load_pruned")
    if wrong:
        raise CheckpointError(f"{path}: weights do not fit the model {Path(directory) / META} describes "
                              f"({len(wrong)} tensors of another shape, e.g. {wrong[0]}): meta.json names another "
                              "architecture, class count or channel count than the weights were trained with")
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
