"""Faster weight gradients for convolutions on small feature maps, for CPU training.

oneDNN's weight gradient (torch 2.14.1's CPU kernel, measured on a 2-thread AVX2 EPYC) is
pathologically slow on maps a few pixels across, where the forward pass is cheap:
- depthwise: MobileNetV3-small at 64 px ends on 5x5 depthwise convolutions over 2x2 and 4x4 maps,
  34-108 ms per 256-image batch against 0.6-2 ms forward; summing the k*k shifted products takes
  11-21 ms (slower than oneDNN from 8x8 up);
- dense: resnet18 at 32 px ends on 3x3 convolutions of 512 channels over 1x1 maps, 370 ms per
  384-image batch against 7 ms forward; one GEMM per kernel tap over the positions it reaches takes
  2.4 ms. On wider channels the taps win on larger maps too (512 channels 7x7 1.8x, 256 channels
  14x14 1.4x); on 64-128 channels oneDNN wins from 4x4 outputs up.
Where torch runs AVX-512 kernels (measured on a 2-thread AVX-512 EPYC, batch 256) oneDNN's depthwise
weight gradient is fast (5.7 ms on 2x2 and 4x4 maps; the shifts take 10-20 ms) and its dense one loses
to the taps only up to 2x2 outputs (512 on 1x1 18x, 256 on 2x2 1.9x; 256 on 4x4 0.83x, 512 on 7x7 0.8x).
`python bench/bench_conv_grad.py` prints these per shape. Only the shapes where the replacement won on
this CPU's vector instructions take it (`cpu_limits`); the forward pass and the input gradient stay oneDNN's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SmallMapLimits:
    """The shapes that take the replacement weight gradient (module docstring)."""

    depthwise_max_input_pixels: int     # depthwise convs on input maps of at most this many pixels
    dense_max_output_pixels: int        # dense convs with at most this many output pixels ...
    dense_wide_channels: int            # ... or with this many input channels or more ...
    dense_wide_max_output_pixels: int   # ... and at most this many output pixels


AVX2_LIMITS = SmallMapLimits(16, 4, 256, 196)   # 4x4 depthwise inputs, 2x2 outputs, 14x14 from 256 channels
AVX512_LIMITS = SmallMapLimits(0, 4, 256, 4)    # no depthwise; dense only up to 2x2 outputs


@functools.cache
def cpu_limits() -> SmallMapLimits:
    """By the vector instructions torch dispatches to on this CPU. oneDNN picks its kernels from the CPU on its own,
    so the two agree unless one is capped (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA); only the AMD EPYCs were measured."""
    return AVX512_LIMITS if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else AVX2_LIMITS


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


def _reached_outputs(tap: int, stride: int, pad: int, size_in: int, size_out: int) -> range:
    """Output positions o whose input position stride*o + tap - pad lies inside the map (not padding)."""
    first = max(0, -((tap - pad) // stride))
    last = min(size_out - 1, (size_in - 1 - tap + pad) // stride)
    return range(first, last + 1)


def weight_grad_by_taps(x: torch.Tensor, grad_out: torch.Tensor, kernel: tuple[int, int],
                        stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """d(loss)/d(weight) of a dense conv (groups 1, dilation 1): for every kernel tap, one GEMM of the
    output gradient and the input pixels that tap reads, over the batch and the output positions whose
    window puts the tap inside the map; taps that only ever read padding get zero."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    in_h, in_w = x.shape[-2:]
    out_h, out_w = grad_out.shape[-2:]
    x_hwc, grad_hwc = x.permute(0, 2, 3, 1), grad_out.permute(0, 2, 3, 1)  # views; dense if channels_last
    grad_weight = x.new_zeros(grad_out.shape[1], x.shape[1], kh, kw)
    for i in range(kh):
        rows = _reached_outputs(i, sh, ph, in_h, out_h)
        for j in range(kw):
            cols = _reached_outputs(j, sw, pw, in_w, out_w)
            if not rows or not cols:
                continue
            grads = grad_hwc[:, rows.start : rows.stop, cols.start : cols.stop]
            inputs = x_hwc[:, sh * rows.start + i - ph : sh * (rows.stop - 1) + i - ph + 1 : sh,
                           sw * cols.start + j - pw : sw * (cols.stop - 1) + j - pw + 1 : sw]
            grad_weight[:, :, i, j] = grads.reshape(-1, grads.shape[-1]).t() @ inputs.reshape(-1, inputs.shape[-1])
    return grad_weight


class _ConvSmallMapGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                stride: tuple[int, int], padding: tuple[int, int], groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.groups, ctx.has_bias = stride, padding, groups, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, ctx.stride, ctx.padding, (1, 1), False, (0, 0), ctx.groups,
                (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            by = weight_grad_by_taps if ctx.groups == 1 else weight_grad_by_shifts
            grad_weight = by(x, grad_out, tuple(weight.shape[-2:]), ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None


def _output_pixels(conv: nn.Conv2d, x: torch.Tensor) -> int:
    sizes = zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding)
    out_h, out_w = ((size + 2 * pad - k) // s + 1 for size, k, s, pad in sizes)
    return out_h * out_w


def takes_small_map_grad(conv: nn.Conv2d, x: torch.Tensor, limits: SmallMapLimits | None = None) -> bool:
    """Whether this call's shape is one where the replacement gradient beat oneDNN on this CPU (or `limits`)."""
    limits = limits or cpu_limits()
    if conv.groups > 1:
        return x.shape[-2] * x.shape[-1] <= limits.depthwise_max_input_pixels
    out_pixels = _output_pixels(conv, x)
    return out_pixels <= limits.dense_max_output_pixels or (
        conv.in_channels >= limits.dense_wide_channels and out_pixels <= limits.dense_wide_max_output_pixels)


class SmallMapGradConv2d(nn.Conv2d):
    """nn.Conv2d whose weight gradient on small CPU maps comes from weight_grad_by_taps (dense) or
    weight_grad_by_shifts (depthwise); set as the __class__ of a plain nn.Conv2d: same parameters,
    same state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not under autocast (bf16 on CPU): the Function's backward assumes the forward's own dtypes
        if (x.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and takes_small_map_grad(self, x)):
            return _ConvSmallMapGrad.apply(x, self.weight, self.bias, self.stride, self.padding, self.groups)
        return super().forward(x)


def _is_plain_dense_or_depthwise(module: nn.Module) -> bool:
    """Exactly nn.Conv2d (not timm's Conv2dSame & co., which pad in forward), groups 1 or one input
    channel per filter and per group, integer zero padding, no dilation."""
    if type(module) is not nn.Conv2d:
        return False
    depthwise = module.groups == module.in_channels == module.out_channels > 1
    return ((module.groups == 1 or depthwise) and module.dilation == (1, 1) and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple) and all(isinstance(p, int) for p in module.padding))


@contextlib.contextmanager
def small_map_weight_grads(model: nn.Module) -> Iterator[int]:
    """Within the block, `model`'s plain dense and depthwise convolutions take the replacement weight
    gradient on small CPU maps; yields how many were switched. Restored on exit, so export, pruning's
    dependency graph and saved checkpoints see plain nn.Conv2d."""
    switched = [m for m in model.modules() if _is_plain_dense_or_depthwise(m)]
    for module in switched:
        module.__class__ = SmallMapGradConv2d
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__class__ = nn.Conv2d
