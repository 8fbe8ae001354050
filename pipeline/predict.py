"""Un-noised forward passes (eval mode, eval transform) over in-memory images."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.loader import Transform, eval_batches, to_model_input


@torch.no_grad()
def predict_logits(accelerator: Accelerator, model: torch.nn.Module, images: list[np.ndarray],
                   transform: Transform, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
                   workers: int, channels_last: bool, desc: str = "eval", progress: bool = True) -> np.ndarray:
    """fp32 logits in input order; each process predicts its slice, results are gathered."""
    n = len(images)
    model = accelerator.unwrap_model(model).eval()
    mean, std = mean.to(accelerator.device), std.to(accelerator.device)
    with accelerator.split_between_processes(list(range(n)), apply_padding=True) as part:
        chunk = [images[i] for i in part]
        outputs = []
        loader = eval_batches(chunk, transform, batch_size, workers)
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False,
                             disable=not (progress and accelerator.is_local_main_process)):
            x = to_model_input(batch.images, mean, std, accelerator.device, channels_last)
            with accelerator.autocast():
                outputs.append(model(x).float())
        logits = torch.cat(outputs) if outputs else torch.empty(0)
    return accelerator.gather(logits)[:n].cpu().numpy()
