"""Un-noised forward passes (eval mode, eval transform) over in-memory images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from augment import build_eval_transform
from pipeline.core.bars import progress_bar
from pipeline.data.loader import Transform, eval_batches, to_model_input
from students.prune import is_pruned_checkpoint, load_pruned
from teachers.checkpoint import CheckpointMeta, check_compatible, load_checkpoint


def load_model(directory: Path, num_classes: int | None = None) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Any checkpoint the pipeline writes: a timm/torchvision model, or a pruned one (structure.json)."""
    if is_pruned_checkpoint(directory):
        model, meta = load_pruned(directory)
        check_compatible(meta, None, num_classes, str(directory))
        return model, meta
    return load_checkpoint(directory, num_classes=num_classes)


@torch.no_grad()
def predict_logits(accelerator: Accelerator, model: torch.nn.Module, images: list[np.ndarray],
                   transform: Transform, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
                   workers: int, channels_last: bool, desc: str = "eval", progress: bool = True) -> np.ndarray:
    """fp32 logits in input order; each process predicts its slice, results are gathered.

    Every row travels with its image index: accelerate pads each short slice with a repeat of the last
    index, so with 3 or more processes the padding sits between slices and a plain `gather()[:n]` would
    shift every later row onto its neighbour's image."""
    n = len(images)
    model = accelerator.unwrap_model(model, keep_torch_compile=False).eval()
    mean, std = mean.to(accelerator.device), std.to(accelerator.device)
    with accelerator.split_between_processes(list(range(n)), apply_padding=True) as part:
        index = torch.tensor(part, dtype=torch.long, device=accelerator.device)
        chunk = [images[i] for i in part]
        outputs = []
        loader = eval_batches(chunk, transform, batch_size, workers)
        for batch in progress_bar(loader, desc=desc, unit="batch", leave=False,
                                  disable=not (progress and accelerator.is_local_main_process)):
            x = to_model_input(batch.images, mean, std, accelerator.device, channels_last)
            with accelerator.autocast():
                outputs.append(model(x).float())
        logits = torch.cat(outputs) if outputs else torch.empty(0)
    gathered, where = accelerator.gather(logits).cpu().numpy(), accelerator.gather(index).cpu().numpy()
    in_order = np.empty((n, *gathered.shape[1:]), dtype=gathered.dtype)
    in_order[where] = gathered  # a padded repeat writes its image's own row again
    return in_order


def checkpoint_logits(accelerator: Accelerator, directory: Path, num_classes: int, images: list[np.ndarray],
                      batch_size: int, workers: int, channels_last: bool, desc: str, progress: bool) -> np.ndarray:
    """Logits of a saved model through its own preprocessing: the input size and normalisation
    come from its meta.json, not from whichever stage asks (a student may run at another size)."""
    model, meta = load_model(directory, num_classes)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return predict_logits(accelerator, model.to(accelerator.device), images, build_eval_transform(meta.input_size),
                          torch.tensor(meta.mean), torch.tensor(meta.std), batch_size, workers, channels_last,
                          desc=desc, progress=progress)
