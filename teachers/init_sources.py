"""Starting weights from outside our checkpoint directories: a weights file, or timm's published weights.

Weights are copied by name where the shapes agree; everything else keeps its random init and is
listed in an `InitReport`, so a 1000-class ImageNet head (or a 3-channel stem into a 1-channel
model) is re-initialised rather than refused. Nothing here downloads: timm weights are read from
the local Hugging Face / torch hub caches only.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
LIST_LIMIT = 10


class InitError(ValueError):
    """Starting weights cannot be read or do not fit the model."""


@dataclass(frozen=True)
class InitReport:
    source: str
    loaded: int
    skipped: tuple[str, ...]
    missing: tuple[str, ...]
    head_reinitialised: bool

    def describe(self) -> str:
        """A few log lines: counts, the first skipped / missing names, and whether the head is new."""
        lines = [f"init from {self.source}: loaded {self.loaded} tensors, skipped {len(self.skipped)} source "
                 f"tensors, {len(self.missing)} model tensors not in the source; what was not loaded keeps its "
                 "random init"]
        if self.skipped:
            lines.append(f"  skipped: {_shorten(self.skipped)}")
        if self.missing:
            lines.append(f"  not in the source: {_shorten(self.missing)}")
        if self.head_reinitialised:
            lines.append("  classifier re-initialised for the target classes")
        return "\n".join(lines)


def _shorten(names: tuple[str, ...]) -> str:
    shown = "; ".join(names[:LIST_LIMIT])
    return shown + (f"; and {len(names) - LIST_LIMIT} more" if len(names) > LIST_LIMIT else "")


# ---------------------------------------------------------------- weights files

def _read_raw(path: Path) -> object:
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
            raise InitError(f"{path}: not a readable safetensors file ({exc})") from None
    if name.endswith(TORCH_SUFFIXES):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
            raise InitError(f"{path}: cannot be read as a torch weights file with weights_only=True ({exc}); "
                            "if it pickles Python objects besides tensors, re-save just the state dict") from None
    raise InitError(f"{path}: unknown weights format; expected one of "
                    f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")


def _unwrap(raw: object) -> object:
    """One level of {"state_dict": ...} / {"model": ...} / {"model_state_dict": ...}, as training scripts save."""
    if isinstance(raw, dict):
        for key in WRAPPER_KEYS:
            if isinstance(raw.get(key), dict):
                return raw[key]
    return raw


def _strip_common_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors / .pt / .pth / .bin / .ckpt file, by name, on the CPU.

    Unwraps one level of a training checkpoint's state dict, strips a "module." (DDP) or
    "_orig_mod." (torch.compile) prefix shared by every name, and drops non-tensor values.
    """
    path = Path(path)
    if not path.exists():
        raise InitError(f"{path}: init weights file does not exist")
    if path.is_dir():
        raise InitError(f"{path}: is a directory; pass the weights file itself (e.g. model.safetensors)")
    state = _unwrap(_read_raw(path))
    if not isinstance(state, dict):
        raise InitError(f"{path}: holds a {type(state).__name__}, not a state dict of named tensors")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InitError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(state)[:5])) or 'none'})")
    return _strip_common_prefix(tensors)


# ---------------------------------------------------------------- loading into a model

def classifier_names(model: torch.nn.Module) -> set[str]:
    """Parameter names of the timm classifier (`get_classifier()`; a tuple for distilled heads); empty without one."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        return set()
    head = get()
    heads = head if isinstance(head, (tuple, list)) else (head,)
    ids = {id(h) for h in heads if isinstance(h, torch.nn.Module)}
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if id(module) in ids:
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    return names


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> InitReport:
    """Copy every tensor of `state` whose name and shape match the model's (parameters and buffers).

    Raises InitError when no tensor with at least one dimension matches: a scalar buffer such as
    BatchNorm's num_batches_tracked fits any architecture, so it alone does not count.
    """
    target = model.state_dict()
    matched: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, tensor in state.items():
        if name not in target:
            skipped.append(f"{name}: not in the model")
        elif tuple(tensor.shape) != tuple(target[name].shape):
            skipped.append(f"{name}: source shape {tuple(tensor.shape)} vs model {tuple(target[name].shape)}")
        else:
            matched[name] = tensor
    if not any(t.dim() > 0 for t in matched.values()):
        src, dst = ", ".join(list(state)[:3]), ", ".join(list(target)[:3])
        raise InitError(f"no weights in {source} fit {type(model).__name__}: is it another architecture? "
                        f"source names e.g. {src or 'none'}; model names e.g. {dst}")
    model.load_state_dict(matched, strict=False)
    missing = tuple(name for name in target if name not in state)
    head_new = any(name not in matched for name in classifier_names(model))
    return InitReport(source=source, loaded=len(matched), skipped=tuple(skipped), missing=missing,
                      head_reinitialised=head_new)


# ---------------------------------------------------------------- timm's published weights

def timm_arch(name: str) -> str:
    """The architecture of a timm weights name: "resnet18.a1_in1k" -> "resnet18"."""
    return name.split(".", 1)[0]


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (huggingface_hub froze it at import)."""
    cache = os.getenv("HF_HUB_CACHE") or os.getenv("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.getenv("HF_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                                    "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expanduser(os.path.expandvars(cache)))


def _pretrained_cfg(name: str):
    """timm's pretrained cfg for `name` (default tag when none), or InitError with close names."""
    try:
        cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(timm_arch(name)) else None
    except RuntimeError:  # known architecture, unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        close = difflib.get_close_matches(name, timm.list_pretrained(), n=5, cutoff=0.6)
        hint = (f"did you mean {', '.join(close)}?" if close
                else f"`timm.list_pretrained('{timm_arch(name)}*')` lists the published weights")
        what = "has no published weights" if cfg is not None else "is not a timm pretrained weights name"
        raise InitError(f"'{name}' {what}; {hint}")
    return cfg


def timm_pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """timm's published weights for `name` (e.g. "resnet18.a1_in1k"), from the local cache only; never downloads.

    The state dict is returned as published: timm's per-model `pretrained_filter_fn` (key remapping,
    pos-embed resizing) is not applied.
    """
    return load_state_dict_file(timm_weights_file(name))


def check_timm_weights(name: str, arch: str) -> None:
    """Preflight for `init: timm:NAME` into a model of `arch`: a published name, weights of that architecture
    (another one would fill the model's tensors from the blocks whose names happen to match), in the cache."""
    if timm_arch(name) != arch:
        raise InitError(f"'{name}' are weights of {timm_arch(name)}, the model is {arch}; give weights of {arch} "
                        f"(`timm.list_pretrained('{arch}*')` lists them)")
    timm_weights_file(name)


def timm_weights_file(name: str) -> Path:
    """The cached file of timm's published weights `name`, or InitError saying how to bring it here.

    Looks in the Hugging Face hub cache (model.safetensors, then pytorch_model.bin) and then in
    torch hub's checkpoints/ for url-only weights.
    """
    cfg = _pretrained_cfg(name)
    full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    looked: list[str] = []
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        cache = hf_hub_cache_dir()
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILENAMES
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache), revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        looked.append(f"{cache} for {repo_id} ({' or '.join(filenames)})")
    if cfg.url:
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if file.is_file():
            return file
        looked.append(str(file))
    raise InitError(
        f"timm weights '{full}' are not in the local cache (looked in {'; and '.join(looked)}); nothing is "
        "downloaded here. On a machine with network run "
        f"`python -c \"import timm; timm.create_model('{full}', pretrained=True)\"`, copy its Hugging Face cache "
        "(~/.cache/huggingface/hub, or $HF_HUB_CACHE there) to this machine and set HF_HUB_CACHE (or HF_HOME) to it; "
        "or pass a local weights file (.safetensors/.pth) as the init instead")
