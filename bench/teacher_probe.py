"""Would a cheap change make a better distillation teacher? Top-1 of trained checkpoints, as they are,
averaged with their mirror image (`--flip`), and averaged with each other (`--ensemble`: the mean
softmax of every subset of two or more). `--view-from SIZE` also scores each checkpoint on the view
online distillation feeds it: the eval view at the student's SIZE px, resized to the checkpoint's own
input size by the distill stage's own `TeacherView` (does the shared view cost the teacher accuracy?).

Decide on the holdout split (import with `--holdout-per-class`); the test split is printed beside
it, not for choosing. Without a holdout only test is shown. Prints one JSON line per model or
combination: `holdout_top1` / `test_top1` in %, with `--flip` also `..._flip_avg_top1`, with
`--view-from 64` also `..._from_64px_top1`. The README's "ensemble of rounds", "flip-averaged teacher"
and "shared view" probes are this script:
  python bench/teacher_probe.py runs/hold-ens teacher student_r1 student_r2 student_r3 --ensemble
  python bench/teacher_probe.py runs/holdout-choice teacher student_r1 --flip
  python bench/teacher_probe.py runs/goal32/seed0 student_r3 --view-from 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment import build_eval_transform  # noqa: E402
from pipeline.config.loading import load_config  # noqa: E402
from pipeline.data.imageset import ImageSet, load_labeled_split, open_data  # noqa: E402
from pipeline.data.loader import eval_batches, to_model_input  # noqa: E402
from pipeline.engine.predict import load_model  # noqa: E402
from students.kd_teacher import TeacherView  # noqa: E402
from pipeline.stages.runner import make_run_dir  # noqa: E402


@torch.inference_mode()
def probabilities(checkpoint: Path, num_classes: int, images: list[np.ndarray], flip: bool,
                  view_from: int | None) -> dict[str, np.ndarray]:
    """Softmax of each image through the checkpoint's own preprocessing ("plain"), of its mirror image
    ("mirrored", with `flip`), and of the student-size view as distillation resizes it ("view_from")."""
    model, meta = load_model(checkpoint, num_classes)
    model = model.eval().to(memory_format=torch.channels_last)
    mean, std = torch.tensor(meta.mean), torch.tensor(meta.std)
    found: dict[str, list[torch.Tensor]] = {"plain": [], "mirrored": []}
    for batch in eval_batches(images, build_eval_transform(meta.input_size), 500, 0):
        x = to_model_input(batch.images, mean, std, torch.device("cpu"), True)
        found["plain"].append(model(x).softmax(1))
        if flip:
            found["mirrored"].append(model(torch.flip(x, dims=[3])).softmax(1))
    if view_from is not None:
        teacher = TeacherView(model, meta, torch.device("cpu"), channels_last=True)
        found["view_from"] = [teacher(batch.images.float().div_(255.0)).softmax(1)
                              for batch in eval_batches(images, build_eval_transform(view_from), 500, 0)]
    return {kind: torch.cat(rows).numpy() for kind, rows in found.items() if rows}


def top1(probs: np.ndarray, labels: np.ndarray) -> float:
    return round(float((probs.argmax(1) == labels).mean() * 100), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("stages", nargs="+", help="stages with a checkpoint, e.g. teacher student_r1")
    parser.add_argument("--flip", action="store_true", help="also the mean with the mirror image's softmax")
    parser.add_argument("--ensemble", action="store_true", help="also the mean softmax of every subset")
    parser.add_argument("--view-from", type=int, metavar="SIZE",
                        help="also the top-1 on the eval view at SIZE px resized as online distillation does")
    args = parser.parse_args()
    if args.view_from is not None and args.view_from < 1:
        parser.error(f"--view-from: a size in pixels >= 1, got {args.view_from}")
    missing = [s for s in args.stages if not (args.run_dir / s / "checkpoint").is_dir()]
    if missing:
        raise SystemExit(f"no checkpoint for {', '.join(missing)} under {args.run_dir} "
                         f"(expected {args.run_dir / missing[0] / 'checkpoint'})")
    data_dir = make_run_dir(load_config(args.run_dir / "config.yaml"), args.run_dir).data_dir  # RUN/data or data.path
    data = open_data(data_dir)
    splits: dict[str, ImageSet] = {s: load_labeled_split(data, s) for s in ("holdout", "test") if data.count(s)}
    if "holdout" not in splits:
        print(f"{data_dir} has no holdout split: test only, which is not for choosing", file=sys.stderr)
    found = {(stage, split): probabilities(args.run_dir / stage / "checkpoint", data.num_classes, images.images,
                                           args.flip, args.view_from)
             for stage in args.stages for split, images in splits.items()}
    for stage in args.stages:
        row: dict = {"model": stage}
        for split, images in splits.items():
            probs = found[stage, split]
            row[f"{split}_top1"] = top1(probs["plain"], images.labels)
            if args.flip:
                row[f"{split}_flip_avg_top1"] = top1(probs["plain"] + probs["mirrored"], images.labels)
            if args.view_from is not None:
                row[f"{split}_from_{args.view_from}px_top1"] = top1(probs["view_from"], images.labels)
        print(json.dumps(row), flush=True)
    if args.ensemble:
        for size in range(2, len(args.stages) + 1):
            for subset in itertools.combinations(args.stages, size):
                row = {"model": "+".join(subset)}
                for split, images in splits.items():
                    row[f"{split}_top1"] = top1(sum(found[stage, split]["plain"] for stage in subset), images.labels)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
