"""What the training benches share: their model/data flags and the labeled images they train on."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.data.imageset import DataInfo, channel_stats, load_labeled_split, open_data

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "runs" / "fm" / "data"


def add_model_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="imported data dir (read only)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)


def labeled_images(data_dir: Path) -> tuple[DataInfo, list[np.ndarray], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the import, its labeled images, their labels, channel mean, channel std), as the teacher stage reads them."""
    data = open_data(data_dir)
    labeled = load_labeled_split(data, "labeled")
    mean, std = channel_stats(labeled.images)
    return data, labeled.images, torch.from_numpy(labeled.labels), torch.tensor(mean), torch.tensor(std)


def cycle(items: list):
    while True:
        yield from items
