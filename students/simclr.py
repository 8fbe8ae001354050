"""SimCLR (Chen et al. 2020): NT-Xent on two augmented views, a projection head, a k-NN probe.

Written here rather than taken from `lightly`: the loss is a dozen lines over a similarity matrix,
and lightly would bring its own training stack (pytorch-lightning and its dependencies) to a
project that trains through accelerate; `tests/test_simclr.py` checks the loss against a
hand computation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross-entropy: row i of `z1` and row i of `z2` are the positive pair; the
    other 2N-2 embeddings of the batch are its negatives. Mean over all 2N anchors."""
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # an embedding is not its own negative
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, positives)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows in rank order; the gradient of each rank's own rows is summed over the ranks' losses
    (an all-reduce: gloo has no reduce-scatter). Not torch.distributed.nn.functional.all_gather: deprecated in
    torch 2.14, and it needs equal row counts, where a global batch not divisible by the ranks gives unequal."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        padded = F.pad(local, (0, 0, 0, max(sizes) - len(local))).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The embeddings of every process's rows (with gradients to this process's own), so NT-Xent contrasts
    each anchor with the whole global batch as in one process, not with this rank's share of it. DDP then
    averages the ranks' gradients, each the whole loss's gradient for its rows times the process count:
    exactly the one-process gradient. One process: `local` as it is."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=local.device))
    return _GatherRows.apply(local, [int(c) for c in counts])


class ProjectionHead(nn.Sequential):
    """The 2-layer MLP that SimCLR trains on top of the pooled features and throws away afterwards."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class PooledFeatures(nn.Module):
    """A timm classifier's pooled features (the classifier's input), as a module."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)


class SimCLRModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_dim: int, out_dim: int):
        super().__init__()
        # the classifier is never used (nor trained): frozen, so DDP does not wait for its gradients, which
        # never come (it stopped every multi-process run at the second step)
        head = backbone.get_classifier()
        for module in head if isinstance(head, (tuple, list)) else (head,):
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
        self.features = PooledFeatures(backbone)
        self.projection = ProjectionHead(backbone.num_features, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(x))


def knn_top1(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
             test_labels: np.ndarray, k: int, num_classes: int) -> float:
    """Top-1 of a cosine k-NN vote (labeled split as memory): how linearly usable the features are,
    without training a probe."""
    train = F.normalize(torch.from_numpy(train_features).float(), dim=1)
    test = F.normalize(torch.from_numpy(test_features).float(), dim=1)
    k = min(k, len(train))
    neighbours = (test @ train.T).topk(k, dim=1).indices
    votes = F.one_hot(torch.from_numpy(train_labels)[neighbours], num_classes).sum(1)
    return float((votes.argmax(1).numpy() == test_labels).mean())
