"""Checks of the crash matrix (bench/crash_matrix.py): what a killed run got done, and whether its rerun
matches the uninterrupted reference run byte for byte and left only whole, loadable files."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

# ---- what a killed run got done ---------------------------------------------------------------------
BAR = re.compile(r"\|\s*(\d+)/(\d+)\s*\[")


def last_progress(log: Path, desc: str) -> int | None:
    """The last count the progress bar `desc` showed in a log (bars rewrite themselves with \\r)."""
    best = None
    for segment in re.split(r"[\r\n]", log.read_text(errors="replace")):
        segment = segment.strip()
        if segment.startswith(f"{desc}:"):
            match = BAR.search(segment)
            if match:
                best = int(match.group(1))
    return best


def saved_step(stage_dir: Path) -> int | None:
    """The step in the killed run's resume state (state/, else state.prev/, as the trainer picks)."""
    import torch

    for name in ("state", "state.prev"):
        directory = stage_dir / name
        if not directory.is_dir():
            continue
        for pkl in sorted(directory.glob("custom_checkpoint_*.pkl")):
            try:
                obj = torch.load(pkl, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - a state being written; the trainer would not pick it
                continue
            if isinstance(obj, dict) and "step" in obj and "history" in obj:
                return int(obj["step"])
    return None


def sidecar_snapshot(stage_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(stage_dir.glob("*.labels.npz"))}


def sidecar_images(stage_dir: Path, names: list[str]) -> int:
    total = 0
    for name in names:
        with np.load(stage_dir / name, allow_pickle=False) as z:
            total += len(z["keys"]) if "keys" in z.files else 0
    return total


# ---- comparison with the reference and integrity ------------------------------------------------------
def compared_files(run: Path) -> list[str]:
    """Artifacts that must equal the reference byte for byte (relative paths)."""
    out = []
    for p in sorted((run / "data").rglob("*")):
        if p.is_file() and (p.suffix == ".tar" or p.name in ("manifest.json", "unlabeled_truth.json")):
            out.append(str(p.relative_to(run)))
    for pattern in ("pseudo_label_r1/*.labels.npz", "select_r1/*.plan.npz"):
        out += [str(p.relative_to(run)) for p in sorted(run.glob(pattern))]
    return out


def tensor_difference(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return {"keys_differ": sorted(set(x) ^ set(y))[:10]}
    worst, where, shape_mismatch = 0.0, None, []
    for key in x:
        if x[key].shape != y[key].shape:
            shape_mismatch.append(key)
            continue
        d = float(np.max(np.abs(x[key].astype(np.float64) - y[key].astype(np.float64)))) if x[key].size else 0.0
        if d > worst:
            worst, where = d, key
    return {"max_abs_diff": worst, "tensor": where, "shape_mismatch": shape_mismatch}


def compare_with_reference(run: Path, ref: Path) -> dict[str, Any]:
    ref_files, run_files = compared_files(ref), compared_files(run)
    different = [f for f in ref_files if f in run_files and (run / f).read_bytes() != (ref / f).read_bytes()]
    models = {}
    for stage in ("teacher", "student_r1"):
        a, b = run / stage / "checkpoint" / "model.safetensors", ref / stage / "checkpoint" / "model.safetensors"
        if not a.exists():
            models[stage] = {"identical": False, "missing": True}
        elif a.read_bytes() == b.read_bytes():
            models[stage] = {"identical": True}
        else:
            models[stage] = {"identical": False, **tensor_difference(a, b)}
    return {"files_compared": len(ref_files), "missing": sorted(set(ref_files) - set(run_files)),
            "extra": sorted(set(run_files) - set(ref_files)), "different": different, "models": models}


def integrity(run: Path, stages: tuple[str, ...]) -> dict[str, Any]:
    """Partial or temporary files anywhere under the run dir; resume state left in finished stages."""
    import yaml
    from PIL import Image
    from safetensors.numpy import load_file

    tmp = [str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp")]
    broken: list[str] = []
    checked = 0
    for p in sorted(run.rglob("*")):
        if not p.is_file() or any(part.startswith("state") for part in p.relative_to(run).parts[:-1]):
            continue
        try:
            if p.suffix == ".tar":
                with tarfile.open(p) as archive:
                    for member in archive:
                        if member.isfile():
                            archive.extractfile(member).read()
            elif p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    for name in z.files:
                        z[name]
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".yaml":
                yaml.safe_load(p.read_text())
            elif p.suffix == ".safetensors":
                load_file(str(p))
            elif p.suffix == ".png":
                with Image.open(p) as image:
                    image.verify()
            else:
                continue
            checked += 1
        except Exception as exc:  # noqa: BLE001 - any failure to read is what we report
            broken.append(f"{p.relative_to(run)}: {type(exc).__name__}: {exc}"[:300])
    leftover_state = [str(p.relative_to(run)) for stage in stages for p in (run / stage).glob("state*")
                      if (run / stage / "DONE").exists()]
    not_done = [s for s in stages if not (run / s / "DONE").exists()]
    return {"tmp_files": tmp, "unreadable": broken, "files_checked": checked, "leftover_state": leftover_state,
            "stages_not_done": not_done}
