"""Which files under RUN/<stage>/ a stage wrote, by stage kind: `--from` removes only those (and each one's
`.tmp` of an interrupted atomic write, and anything under the resume-state directories) and refuses a stage
directory holding anything else, which is the user's."""

from __future__ import annotations

import fnmatch
import glob
import json
from pathlib import Path

from pipeline.core.owned import JOURNAL, owned_paths
from pipeline.core.progress import PROGRESS_FILE

SIDECAR_SUFFIX = ".labels.npz"


def shard_stem(shard_name: str) -> str:
    """What a shard's sidecar and plan are named by: its file name without `.tar`."""
    return shard_name.removesuffix(".tar")
FAILED_FILE = "failed.json"  # the error that stopped a stage's last attempt (status shows it; removed on the next)
COMMON_OUTPUTS = ("stage.json", "DONE", "wall_time.json", FAILED_FILE, PROGRESS_FILE, "metrics.json")
CHECKPOINT_FILES = ("model.safetensors", "config.json", "meta.json", "structure.json")
TRAINED_OUTPUTS = tuple(f"{directory}/{name}" for directory in ("checkpoint", "peer") for name in CHECKPOINT_FILES)
STATE_DIRS = ("state", "state.tmp", "state.prev")  # accelerate's resume state, any depth (prune: state/step<k>/)
TRAINED_KINDS = ("teacher", "student", "distill", "prune", "pretrain", "ssl_pretrain")
KIND_OUTPUTS = {
    "data": ("manifest.json",),  # an import's shards are journaled (.selftrain-owned.json)
    "pseudo_label": ("manifest.json", "*" + SIDECAR_SUFFIX),
    "select": ("*.plan.npz", "class_counts.png"),
    "export": ("*.onnx", "*.onnx.data", "deployment.md", "pareto.png"),
    "report": ("report.md", "summary.csv", "accuracy_by_round.png", "loss_terms.png"),
    **{kind: TRAINED_OUTPUTS for kind in TRAINED_KINDS},
}


def stage_outputs(kind: str | None, directory: Path | None = None) -> tuple[str, ...]:
    """The file patterns a stage of `kind` writes (None: any kind's). An export stage in `directory` that
    recorded its models owns exactly their files: a user's own `.onnx` beside them (a copy, an fp16 or
    simplified model) is theirs, and `--from` refuses to remove it."""
    kinds = [kind] if kind is not None else list(KIND_OUTPUTS)
    models = exported_models(directory) if kind == "export" and directory is not None else None
    patterns = COMMON_OUTPUTS + tuple(p for k in kinds for p in KIND_OUTPUTS.get(k, ())
                                      if models is None or not p.endswith((".onnx", ".onnx.data")))
    if models is not None:
        patterns += tuple(f"{model}{suffix}" for model in models
                          for suffix in (".onnx", ".onnx.data", ".int8.onnx", ".int8.onnx.data"))
    return patterns + tuple(p + ".tmp" for p in patterns)


def exported_models(directory: Path) -> list[str] | None:
    """The model names an export stage recorded in its stage.json (`inputs.models`), None when unreadable."""
    try:
        models = json.loads((directory / "stage.json").read_text())["inputs"]["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [glob.escape(str(name)) for name in models] if isinstance(models, dict) else None


def foreign_stage_files(directory: Path, kind: str | None = None) -> list[str]:
    """Files under a stage directory that are neither journaled nor written by a stage of `kind` (None: any
    kind): a user's plot in a teacher's directory, or a backup folder inside checkpoint/, is theirs."""
    owned = owned_paths(directory) | {JOURNAL}  # the data stage's import journals its shards
    journaled = owned | {name + ".tmp" for name in owned}  # and writes each as NAME.tmp first (a kill leaves it)
    patterns = stage_outputs(kind, directory)
    trained = kind is None or kind in TRAINED_KINDS
    found = []
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            continue
        relative = str(path.relative_to(directory))
        if relative in journaled or (trained and relative.split("/", 1)[0] in STATE_DIRS):
            continue
        if not any(relative.count("/") == pattern.count("/") and fnmatch.fnmatchcase(relative, pattern)
                   for pattern in patterns):  # fnmatch's * crosses "/": a user's sub/x.onnx is not ours
            found.append(relative)
    return found
