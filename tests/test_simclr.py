import math

import numpy as np
import pytest
import torch

from students.simclr import knn_top1, nt_xent_loss


def hand_nt_xent(z1, z2, t):
    """The SimCLR paper's l(i, j) summed over all 2N anchors, written out with Python loops."""
    z = [[x / math.sqrt(sum(x * x for x in v)) for x in v] for v in z1 + z2]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sim = lambda a, b: sum(x * y for x, y in zip(z[a], z[b])) / t
        denominator = sum(math.exp(sim(i, k)) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(i, j)) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_nt_xent_matches_a_hand_computation(t):
    z1 = [[1.0, 0.0, 0.5], [0.2, 1.0, -0.3]]
    z2 = [[0.9, 0.1, 0.4], [-0.1, 0.8, 0.0]]
    got = nt_xent_loss(torch.tensor(z1), torch.tensor(z2), t)
    assert float(got) == pytest.approx(hand_nt_xent(z1, z2, t), rel=1e-3)  # float32 vs Python floats


def test_nt_xent_is_low_for_matching_views_and_high_for_swapped_ones():
    z = torch.eye(4)
    assert float(nt_xent_loss(z, z, 0.1)) < 0.01
    assert float(nt_xent_loss(z, z.roll(1, 0), 0.1)) > 5


def test_knn_top1_votes_by_nearest_labeled_features():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    test = np.array([[1, 0.05], [0.05, 1]], dtype=np.float32)
    assert knn_top1(train, labels, test, np.array([0, 1]), k=2, num_classes=2) == 1.0
    assert knn_top1(train, labels, test, np.array([1, 0]), k=2, num_classes=2) == 0.0


def _gathered_loss_and_grads(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out) -> None:
    import os

    import torch.distributed as dist

    from students.simclr import gather_rows
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = [list(r) for r in np.array_split(np.arange(len(z1)), world)]  # 3 / 3 / 2: unequal shares
        a, b = (z[rows[rank]].clone().requires_grad_(True) for z in (z1, z2))
        loss = nt_xent_loss(gather_rows(a), gather_rows(b), 0.5)
        loss.backward()
        out[rank] = (loss.item(), rows[rank], a.grad / world, b.grad / world)  # DDP averages the ranks' gradients
    finally:
        dist.destroy_process_group()


def test_nt_xent_over_processes_equals_one_process():
    """Each rank contrasts its anchors with every rank's embeddings: the loss and, after DDP's averaging, the
    gradients are those of one process on the whole batch (each rank saw only its own negatives before)."""
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    expected = nt_xent_loss(a, b, 0.5)
    expected.backward()
    out = mp.Manager().dict()
    mp.spawn(_gathered_loss_and_grads, args=(3, 29613, z1, z2, out), nprocs=3)
    for rank in range(3):
        loss, rows, grad_a, grad_b = out[rank]
        assert loss == pytest.approx(expected.item(), abs=1e-6)
        torch.testing.assert_close(grad_a, a.grad[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_b, b.grad[rows], atol=1e-6, rtol=1e-5)
