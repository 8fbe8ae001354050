"""Structured filter pruning: L1-norm filter ranking (Li et al. 2016, arXiv 1608.08710) over
torch-pruning's dependency graph (DepGraph), iterated with fine-tuning until a MACs target.

Whole output filters are removed, and with them every coupled channel (BatchNorm, the next layer's
input channels, depthwise convolutions, squeeze-excite, residual adds), so weight tensors shrink and
dense CPU kernels do less work. A pruned model no longer matches `timm.create_model(arch)`:
`save_pruned` records the shapes in `structure.json` beside the usual checkpoint files and
`load_pruned` rebuilds the timm model, reshapes it to that record and loads the weights strictly.

What is traced: `students/prune_parts.py` splits the model into parts torch-pruning can trace (the
whole model, or ShuffleNet V2's branches and tail) and names the layers whose outputs stay whole.

How the MACs target is reached: torch-pruning's `pruning_ratio` is a channel ratio, so each part's
pruner is built with a fine linear channel schedule (channel ratio k * `granularity`, k = 0..K, every layer
pruned locally to the same ratio of its initial width, each ranking its own filters by L1 norm).
Step i of `steps` has the sub-target MACs_0 * target_ratio ** (i / steps) (each step removes the
same fraction of the remaining MACs). Within a step the schedule is advanced, re-counting MACs
after each advance, until MACs <= the sub-target; each advance jumps to the channel ratio that a
quadratic MACs model (MACs ~ width^2) predicts, which undershoots (depthwise convolutions scale
linearly), so the target is approached from above and the last moves are single schedule entries.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch_pruning as tp
from torch import nn

from pipeline.core.atomic import write_json
from teachers.checkpoint import WEIGHTS, CheckpointMeta, read_meta, read_weights, save_checkpoint
from teachers.models import create_model
from students.prune_parts import PruneError, PrunePart, classifier_layers, prune_parts

STRUCTURE = "structure.json"
STRUCTURE_FORMAT = "selftrain-pruned-structure/1"
# module attributes that define (or describe) tensor shapes and change when channels are removed
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "num_channels", "normalized_shape", "head_hidden_size")

FineTune = Callable[[nn.Module, int], None]


@dataclass
class PruneReport:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: int
    # {"step", "macs", "params", "channel_ratio" (the schedule's), "conv_channels_kept" (after rounding)}
    per_step: list[dict] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before


def l1_filter_ranking(conv: nn.Conv2d) -> torch.Tensor:
    """L1 norm of each output filter, sum |W[j, :, :, :]| (the Li et al. criterion), shape [out_channels]."""
    return conv.weight.detach().abs().flatten(1).sum(1)


def l1_importance() -> tp.importance.Importance:
    """torch-pruning importance equal to `l1_filter_ranking` of each group's root layer:
    p=1, only the first (root) layer of a coupled group, no normalisation."""
    return tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Pruning bookkeeping runs thousands of ops on tiny tensors; extra threads only add overhead
    (on a busy 2-core machine a 2-thread abs() of a 576x96 tensor took 300x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def count_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) for one forward of `example_input`, by torch-pruning's counter (on a copy,
    eval mode: convolutions and linears as multiply-accumulates, plus BatchNorm and activations)."""
    macs, params = tp.utils.count_ops_and_params(model, example_input.to(_device_of(model)))
    return int(macs), int(params)


class _KeepRoundedUpPruner(tp.pruner.BasePruner):
    """torch-pruning's `round_to` rounds the kept width *down* to a multiple: a layer of 16 asked to lose one
    channel loses 8, so a MACs target of 0.9 ended at 0.80 for MobileNetV3-small and every layer was no longer
    pruned to the schedule's ratio. Here the kept width is rounded *up*: a layer loses its 8 channels once the
    schedule asks for them (0.88 for that target; README "Pruning")."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        kept = min(math.ceil((current_channels - n_pruned) / round_to) * round_to, current_channels)
        return max(current_channels - kept, 0)


def _part_pruner(part: PrunePart, entries: int, granularity: float, max_channel_ratio: float,
                 round_to: int | None) -> tp.pruner.BasePruner:
    return _KeepRoundedUpPruner(
        part.module, part.example_input.to(_device_of(part.module)), importance=l1_importance(),
        global_pruning=False, pruning_ratio=entries * granularity, iterative_steps=entries,
        max_pruning_ratio=max_channel_ratio, ignored_layers=part.ignored, round_to=round_to)


def build_pruners(model: nn.Module, example_input: torch.Tensor, granularity: float = 0.005,
                  max_channel_ratio: float = 0.9, round_to: int | None = None) -> list[tp.pruner.BasePruner]:
    """Local L1 pruners, one per `prune_parts` part, whose schedule entry k prunes every layer to
    k * granularity of its width (all parts share the schedule).

    Raises PruneError when torch-pruning cannot build a part's dependency graph."""
    entries = max(1, int(round(max_channel_ratio / granularity)))
    try:
        return [_part_pruner(part, entries, granularity, max_channel_ratio, round_to)
                for part in prune_parts(model, example_input.to(_device_of(model)))]
    except PruneError:
        raise
    except Exception as error:  # noqa: BLE001 - any tracing failure means this model cannot be pruned
        raise PruneError(f"torch-pruning cannot trace {type(model).__name__} to prune it "
                         f"({type(error).__name__}: {error})") from error


def _head_width_attrs(model: nn.Module) -> list[str]:
    """Model attributes (timm's num_features, head_hidden_size) that equal the classifier's input width."""
    heads = classifier_layers(model)
    width = getattr(heads[0], "in_features", None) if heads else None
    return [a for a in ("num_features", "head_hidden_size") if width is not None and model.__dict__.get(a) == width]


def _sync_head_width(model: nn.Module, attrs: list[str]) -> None:
    """Keep those attributes equal to the (pruned) classifier input width."""
    for attr in attrs:
        setattr(model, attr, classifier_layers(model)[0].in_features)


def _next_entry(pruner: tp.pruner.BasePruner, macs: int, target: float) -> int:
    """Schedule entry predicted to bring `macs` down to `target` by MACs ~ (1 - channel_ratio)^2,
    at least one entry ahead. Where MACs fall slower (depthwise convolutions, parts left whole) the
    prediction falls short, so the target is still approached from above."""
    ratios = pruner.per_step_pruning_ratio
    keep = (1.0 - ratios[pruner.current_step]) * math.sqrt(target / macs)
    wanted = 1.0 - keep
    entry = max((k for k, r in enumerate(ratios) if r <= wanted + 1e-12), default=0)
    return min(max(entry, pruner.current_step + 1), pruner.iterative_steps)


def _conv_channels(model: nn.Module) -> int:
    """Output channels of every convolution: what `channel_ratio` (the schedule, before rounding) removes."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def _prune_until(pruners: list[tp.pruner.BasePruner], model: nn.Module, example_input: torch.Tensor,
                 target: float) -> tuple[int, int]:
    """Advance the pruners' shared schedule until MACs <= target; returns (MACs, params)."""
    macs, params = count_macs(model, example_input)
    lead = pruners[0]
    while macs > target:
        if lead.current_step >= lead.iterative_steps:
            ratio = lead.per_step_pruning_ratio[lead.current_step]
            raise PruneError(f"cannot reach {target:.0f} MACs: {macs} are left with every prunable layer at "
                             f"{ratio:.0%} of its channels removed (the most pruning takes); raise the MACs target")
        entry = _next_entry(lead, macs, target)
        for pruner in pruners:
            pruner.current_step = entry - 1  # step() advances by one, then prunes
            pruner.step()
        macs, params = count_macs(model, example_input)
    return macs, params


def prune_to_macs(model: nn.Module, example_input: torch.Tensor, target_ratio: float, steps: int,
                  fine_tune: FineTune | None = None, granularity: float = 0.005,
                  max_channel_ratio: float = 0.9, round_to: int | None = None) -> PruneReport:
    """Prune `model` in place until MACs / original MACs <= target_ratio, in `steps` steps.

    After step i (1-based) `fine_tune(model, i)` runs if given; it must train the modules in place
    (new optimizer each call: pruning replaces the Parameter objects; no module replacement).
    The model is in eval mode while pruning and ends in the mode it came in; after a PruneError it
    stays pruned as far as it got."""
    if not 0.0 < target_ratio < 1.0:
        raise PruneError(f"target_ratio must be in (0, 1), got {target_ratio}")
    if steps < 1:
        raise PruneError(f"steps must be >= 1, got {steps}")
    was_training = model.training
    head_attrs = _head_width_attrs(model)
    model.eval()
    try:
        channels0 = _conv_channels(model)
        with _one_thread():
            macs0, params0 = count_macs(model, example_input)
            pruners = build_pruners(model, example_input, granularity, max_channel_ratio, round_to)
        report = PruneReport(macs0, macs0, params0, params0, steps)
        for step in range(1, steps + 1):
            with _one_thread():
                macs, params = _prune_until(pruners, model, example_input, macs0 * target_ratio ** (step / steps))
            _sync_head_width(model, head_attrs)
            if fine_tune is not None:
                fine_tune(model, step)
                model.eval()
            report.per_step.append({"step": step, "macs": macs, "params": params,
                                    "channel_ratio": pruners[0].per_step_pruning_ratio[pruners[0].current_step],
                                    "conv_channels_kept": _conv_channels(model) / channels0})
            report.macs_after, report.params_after = macs, params
    finally:
        model.train(was_training)
    return report


def _shape_attrs(module: nn.Module) -> dict:
    attrs = {}
    for name in SHAPE_ATTRS:
        value = module.__dict__.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            attrs[name] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
            attrs[name] = list(value)
    return attrs


def pruned_structure(model: nn.Module) -> dict:
    """JSON-able shapes of every module that owns tensors or shape attributes: its type, shape
    attributes (in/out channels, groups, features, ...) and the shape of each own parameter and buffer."""
    modules = {}
    for name, module in model.named_modules():
        tensors = {key: list(value.shape) for key, value in
                   [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}
        attrs = _shape_attrs(module)
        if tensors or attrs:
            modules[name] = {"type": type(module).__name__, "attrs": attrs, "tensors": tensors}
    return {"format": STRUCTURE_FORMAT, "modules": modules}


def save_pruned(directory: Path, model: nn.Module, meta: CheckpointMeta) -> str:
    """Write `structure.json` (atomically), then the normal checkpoint (weights,
    meta.json last); returns the weights' sha256.

    No timm config.json: its widths would be the unpruned ones, so timm's `local-dir:` loader cannot
    rebuild a pruned model; `load_pruned` (and `pipeline.engine.predict.load_model`) can."""
    directory = Path(directory)
    structure = {**pruned_structure(model), "arch": meta.arch, "num_classes": meta.num_classes,
                 "in_chans": meta.in_chans}
    write_json(directory / STRUCTURE, structure)
    return save_checkpoint(directory, model, meta, timm_config=False)


def _is_shape(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def read_structure(directory: Path, meta: CheckpointMeta) -> dict:
    """structure.json, checked against the checkpoint's meta; PruneError naming the file otherwise."""
    path = Path(directory) / STRUCTURE
    if not path.exists():
        raise PruneError(f"{path}: missing; {directory} is not a pruned checkpoint (save it with save_pruned)")
    try:
        structure = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PruneError(f"{path}: malformed pruned structure ({exc})") from None
    if not isinstance(structure, dict) or structure.get("format") != STRUCTURE_FORMAT:
        raise PruneError(f"{path}: malformed pruned structure (format is not '{STRUCTURE_FORMAT}')")
    for key in ("arch", "num_classes", "in_chans"):
        if structure.get(key) != getattr(meta, key):
            raise PruneError(f"{path}: {key} is {structure.get(key)!r}, but meta.json says {getattr(meta, key)!r}")
    modules = structure.get("modules")
    if not isinstance(modules, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("type"), str) and isinstance(entry.get("attrs"), dict)
            and isinstance(entry.get("tensors"), dict) and all(map(_is_shape, entry["tensors"].values()))
            for entry in modules.values()):
        raise PruneError(f"{path}: malformed pruned structure (modules need type, attrs and tensor shapes)")
    return structure


def _reshape_module(module: nn.Module, entry: dict, where: str) -> None:
    if type(module).__name__ != entry["type"]:
        raise PruneError(f"{where}: is a {type(module).__name__}, structure.json says {entry['type']}")
    for key, value in entry["attrs"].items():
        if key not in SHAPE_ATTRS or key not in module.__dict__:
            raise PruneError(f"{where}: has no shape attribute '{key}'")
        setattr(module, key, tuple(value) if isinstance(value, list) else value)
    for key, shape in entry["tensors"].items():
        if module._parameters.get(key) is not None:
            old = module._parameters[key]
            module._parameters[key] = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                                   requires_grad=old.requires_grad)
        elif module._buffers.get(key) is not None:
            old = module._buffers[key]
            module._buffers[key] = torch.empty(shape, dtype=old.dtype, device=old.device)
        else:
            raise PruneError(f"{where}: has no tensor '{key}'")


def apply_structure(model: nn.Module, structure: dict, where: str = STRUCTURE) -> nn.Module:
    """Reshape a freshly built model in place to a `pruned_structure` record (tensors left empty)."""
    modules = dict(model.named_modules())
    for name, entry in structure["modules"].items():
        if name not in modules:
            raise PruneError(f"{where}: module '{name}' is not in the {type(model).__name__} model")
        _reshape_module(modules[name], entry, f"{where}: module '{name}'")
    return model


def load_pruned(directory: Path, drop_rate: float = 0.0,
                drop_path_rate: float = 0.0) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild a `save_pruned` checkpoint: create the timm model, reshape it to structure.json,
    load the weights strictly."""
    directory = Path(directory)
    meta = read_meta(directory)
    structure = read_structure(directory, meta)
    model = create_model(meta.arch, meta.num_classes, meta.in_chans, drop_rate, drop_path_rate)
    apply_structure(model, structure, str(directory / STRUCTURE))
    state = read_weights(directory)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PruneError(f"{directory / WEIGHTS}: weights do not fit {STRUCTURE} ({exc})") from None
    return model, meta


def is_pruned_checkpoint(directory: Path) -> bool:
    return (Path(directory) / STRUCTURE).exists()
