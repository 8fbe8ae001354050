"""A faster weight gradient for depthwise convolutions on tiny feature maps, for CPU training.

oneDNN's depthwise weight gradient (torch 2.14.1's CPU kernel) is pathologically slow when the
input is a few pixels across: MobileNetV3-small at 64 px ends on 5x5 depthwise convolutions over
2x2 and 4x4 maps, where one weight gradient of a 256-image batch takes 34-108 ms against 0.6-2 ms
for the forward pass (AVX2 EPYC, 2 threads). Summing the k*k shifted products instead takes 11-21 ms,
and about half of MobileNetV3-small's training step was these gradients
(`python bench/bench_train_step.py --arch mobilenetv3_small_100 --size 64`). On larger maps
oneDNN is faster than the shifts, so only inputs of at most SMALL_INPUT_PIXELS pixels take this path.
The forward pass and the input gradient stay oneDNN's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

SMALL_INPUT_PIXELS = 16  # 4 x 4: every map where the shifts beat oneDNN in the measurement above


def weight_grad_by_shifts(x: torch.Tensor, grad_out: torch.Tensor, kernel: tuple[int, int],
                          stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """d(loss)/d(weight) of a depthwise conv (groups = channels, dilation 1): for every kernel tap,
    the batch-and-space sum of the input window it sees times the output gradient."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    padded = F.pad(x, (pw, pw, ph, ph))
    out_h, out_w = grad_out.shape[-2:]
    grad_weight = x.new_empty(x.shape[1], 1, kh, kw)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw]
            grad_weight[:, 0, i, j] = (window * grad_out).sum((0, 2, 3))
    return grad_weight


class _DepthwiseConvShiftGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, ctx.stride, ctx.padding, (1, 1), False, (0, 0), weight.shape[0],
                (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad_by_shifts(x, grad_out, tuple(weight.shape[-2:]), ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


class ShiftGradDepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d whose weight gradient on tiny CPU inputs comes from weight_grad_by_shifts
    (set as the __class__ of a plain depthwise nn.Conv2d: same parameters, same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not under autocast (bf16 on CPU): the Function's backward assumes the forward's own dtypes
        if (x.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and x.shape[-2] * x.shape[-1] <= SMALL_INPUT_PIXELS):
            return _DepthwiseConvShiftGrad.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


def _is_plain_depthwise(module: nn.Module) -> bool:
    """Exactly nn.Conv2d (not timm's Conv2dSame & co., which pad in forward), one input channel per
    filter and per group, integer zero padding, no dilation."""
    return (type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels > 1
            and module.dilation == (1, 1) and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple) and all(isinstance(p, int) for p in module.padding))


@contextlib.contextmanager
def shift_grad_depthwise(model: nn.Module) -> Iterator[int]:
    """Within the block, `model`'s plain depthwise convolutions use the shift weight gradient on tiny
    CPU inputs; yields how many were switched. Restored on exit, so export, pruning's dependency
    graph and saved checkpoints see plain nn.Conv2d."""
    switched = [m for m in model.modules() if _is_plain_depthwise(m)]
    for module in switched:
        module.__class__ = ShiftGradDepthwiseConv2d
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__class__ = nn.Conv2d
