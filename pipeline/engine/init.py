"""Where a training stage's weights start: `model.init` resolved and applied.

    null / "random"         random init
    "teacher"               the round's teacher (student stages)
    "pretrain"              this run's supervised pretraining stage (new head for the target classes)
    "ssl_pretrain"          this run's SimCLR stage (its head was never trained: re-initialised)
    "timm:NAME"             timm's published weights, from the local cache only
    a checkpoint directory  ours (meta.json): same classes load exactly; other classes get a new head;
                            a deeper model of the same family is grown from it
    a weights file          .safetensors / .pt / .pth / .bin: a timm state dict, matched by name and shape

Whatever is not loaded keeps its random init and is listed (`InitOutcome.describe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.atomic import sha256_file
from pipeline.core.rundir import RunDir
from teachers.checkpoint import (META, WEIGHTS, CheckpointError, checkpoint_hash, has_trained_head, load_weights_into,
                                 read_meta, read_weights)
from teachers.grow import Growth, grow_from
from teachers.init_sources import (InitError, InitReport, check_timm_weights, classifier_names, load_matching,
                                   load_state_dict_file, timm_pretrained_state)
from teachers.models import ModelError

RANDOM, FROM_TEACHER, TIMM_PREFIX = "random", "teacher", "timm:"
RUN_STAGES = ("pretrain", "ssl_pretrain")  # init names that mean "this run's stage of that name"


@dataclass(frozen=True)
class InitSource:
    """A resolved `model.init`: what to read, and what to call it in logs and metrics."""

    text: str  # as configured
    path: Path | None = None  # a checkpoint directory or a weights file
    timm_name: str | None = None

    @property
    def is_random(self) -> bool:
        return self.path is None and self.timm_name is None


@dataclass(frozen=True)
class InitOutcome:
    source: InitSource
    report: InitReport | None = None  # name/shape matching (other classes, files, timm weights)
    growth: Growth | None = None  # a deeper model grown from a shallower checkpoint

    def describe(self) -> str:
        if self.source.is_random:
            return "random init"
        if self.growth is not None:
            g = self.growth
            head = ", the classifier re-initialised for the target classes" if g.head_reinitialised else ""
            return (f"grown from {g.source_arch} at {self.source.path}: {g.loaded} tensors copied, {g.fresh} new "
                    f"ones start as identity blocks{head} (largest {g.compared} difference {g.max_output_diff:.1e})")
        if self.report is None:
            return f"all weights from {self.source.path}"
        return self.report.describe()

    def metrics(self) -> dict:
        found = {"source": self.source.text}
        if self.growth is not None:
            found.update({"grown_from": self.growth.source_arch, "head_reinitialised": self.growth.head_reinitialised})
        if self.report is not None:
            found.update({"loaded": self.report.loaded, "skipped": list(self.report.skipped),
                          "missing": list(self.report.missing),
                          "head_reinitialised": self.report.head_reinitialised})
        return found


def resolve_init(init: str | None, teacher_dir: Path | None, run: RunDir) -> InitSource:
    if init is None or init == RANDOM:
        return InitSource(init or RANDOM)
    if init == FROM_TEACHER:
        if teacher_dir is None:
            raise ModelError('model.init "teacher" only applies to student stages (the teacher has no teacher); '
                             "give a checkpoint directory or null")
        return InitSource(init, path=teacher_dir)
    if init in RUN_STAGES:
        return InitSource(init, path=run.checkpoint_dir(init))
    if init.startswith(TIMM_PREFIX):
        return InitSource(init, timm_name=init[len(TIMM_PREFIX):])
    return InitSource(init, path=Path(init))


def names_a_path(init: str | None) -> bool:
    """Whether `init` is a checkpoint directory or weights file (not random, teacher, a run stage or timm:)."""
    return not (init is None or init in (RANDOM, FROM_TEACHER, *RUN_STAGES) or init.startswith(TIMM_PREFIX))


def init_content_inputs(init: str | None, fingerprinted: bool, key: str = "init_sha256") -> dict:
    """`{key: sha256}` for an init read from a path (a checkpoint directory or a weights file), so weights
    replaced under the same name make a changed input (the path alone did not). None for other inits, and none
    when not `fingerprinted` (the stage's record was made before this key existed)."""
    if not fingerprinted or not names_a_path(init):
        return {}
    path = Path(init)
    if path.is_dir():
        return {key: checkpoint_hash(path)}
    return {key: sha256_file(path)} if path.is_file() else {}  # missing: preflight names it


def check_init_exists(init: str | None, arch: str, key: str) -> None:
    """Preflight: a path init must exist (as a checkpoint directory or a weights file); timm weights must be
    the model's architecture's and in the local cache."""
    if init is not None and init.startswith(TIMM_PREFIX):
        try:
            check_timm_weights(init[len(TIMM_PREFIX):], arch)
        except InitError as error:
            raise InitError(f"{key}: {error}") from None
        return
    if not names_a_path(init):
        return
    path = Path(init)
    if path.is_dir() and not (path / META).exists():
        raise ModelError(f"{key}: {path} is a directory but not a checkpoint (no {META}); give a checkpoint "
                         "directory, a weights file (.safetensors/.pt/.pth/.bin), timm:NAME, pretrain, "
                         "ssl_pretrain or random")
    if path.is_dir():
        try:
            read_meta(path)
            checkpoint_hash(path)  # its weights are there and are the ones meta.json records
        except CheckpointError as error:
            raise ModelError(f"{key}: {error}") from None
    if not path.exists():
        raise ModelError(f"{key}: {path} does not exist (a checkpoint directory, a weights file, timm:NAME, "
                         "pretrain, ssl_pretrain or random)")


def adapt_stem(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """3-channel conv weights summed into a model with other input channels, as timm's own loader does
    (`timm.models.adapt_input_conv`): an RGB stem then starts a grayscale model."""
    from timm.models import adapt_input_conv

    expected = model.state_dict()
    adapted = dict(state)
    for name, value in state.items():
        target = expected.get(name)
        if (target is not None and value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3
                and target.shape[1] != 3 and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]):
            adapted[name] = adapt_input_conv(target.shape[1], value)
    return adapted


def apply_init(model: torch.nn.Module, source: InitSource, arch: str, class_names: tuple[str, ...],
               in_chans: int) -> InitOutcome:
    """Load `source` into `model` (built for `arch`, the target `class_names` and `in_chans` input channels)."""
    if source.is_random:
        return InitOutcome(source)
    if source.timm_name is not None:
        state = adapt_stem(model, timm_pretrained_state(source.timm_name))
        return InitOutcome(source, report=load_matching(model, state, source.text))
    path = source.path
    if path.is_dir():
        meta = read_meta(path)
        # a head trained on other classes (even as many) or never trained (SimCLR) is re-initialised
        other_head = tuple(meta.class_names) != tuple(class_names) or not has_trained_head(meta)
        if meta.arch != arch:
            new_head = frozenset(classifier_names(model)) if other_head else frozenset()
            return InitOutcome(source, growth=grow_from(model, path, meta, new_head))
        if not other_head and meta.in_chans == in_chans:
            load_weights_into(model, path)
            return InitOutcome(source)
        # other classes: a new head; other input channels: an RGB stem summed for grayscale, as for weights files
        head = classifier_names(model) if other_head else set()
        state = adapt_stem(model, {k: v for k, v in read_weights(path).items() if k not in head})
        return InitOutcome(source, report=load_matching(model, state, str(path / WEIGHTS)))
    if not path.exists():
        raise InitError(f"model.init: {path} does not exist")
    return InitOutcome(source, report=load_matching(model, adapt_stem(model, load_state_dict_file(path)), str(path)))
