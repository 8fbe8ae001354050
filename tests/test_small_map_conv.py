"""The small-map weight gradients (pipeline/engine/small_map_conv.py: shifts for depthwise convolutions,
per-tap GEMMs for dense ones) equal autograd's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.engine import small_map_conv
from pipeline.engine.small_map_conv import (AVX2_LIMITS, AVX512_LIMITS, SmallMapGradConv2d, cpu_limits,
                                            small_map_weight_grads, takes_small_map_grad)
from teachers.models import create_model


@pytest.fixture(autouse=True)
def widest_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every replacement path is tested on any CPU: the AVX2 limits take the most shapes."""
    monkeypatch.setattr(small_map_conv, "cpu_limits", lambda: AVX2_LIMITS)


def _weight_grad(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(grad, x, conv.weight.to(x.dtype), None, conv.stride, conv.padding,
                                               conv.dilation, False, (0, 0), conv.groups, (False, True, False))[1]


def _assert_gradients_equal(plain: nn.Conv2d, switched: nn.Conv2d, x: torch.Tensor) -> None:
    """Input gradient and bias as autograd's; the weight gradient within float32 summation error of the
    float64 result (8 eps times the sum of the absolute products), as oneDNN's own is."""
    switched.load_state_dict(plain.state_dict())
    x_plain, x_switched = x.clone().requires_grad_(), x.clone().requires_grad_()
    with small_map_weight_grads(switched) as count:
        assert count == 1 and type(switched) is SmallMapGradConv2d
        assert takes_small_map_grad(switched, x)  # the replacement path is the one tested
        out = switched(x_switched)
    reference = plain(x_plain)
    assert torch.equal(out, reference)  # the forward pass is the same conv2d call
    grad = torch.randn_like(reference)
    reference.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x_switched.grad, x_plain.grad)
    exact = _weight_grad(plain, x.double(), grad.double())
    bound = 8 * torch.finfo(torch.float32).eps * _weight_grad(plain, x.double().abs(), grad.double().abs())
    assert ((plain.weight.grad.double() - exact).abs() <= bound).all()  # the bound holds for oneDNN's
    assert ((switched.weight.grad.double() - exact).abs() <= bound).all()
    if plain.bias is not None:
        torch.testing.assert_close(switched.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("side", "kernel", "stride", "channels_last", "bias"), [
    (2, 5, 1, True, False), (4, 5, 1, False, False), (4, 5, 2, True, False), (3, 3, 2, False, True),
    (4, 3, 1, True, True), (1, 3, 1, False, False), (2, 1, 1, True, False),
])
def test_depthwise_gradients_equal_autograd_s(side: int, kernel: int, stride: int, channels_last: bool,
                                              bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Conv2d(24, 24, kernel, stride, kernel // 2, groups=24, bias=bias)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, 24, side, side).contiguous(memory_format=fmt)
    _assert_gradients_equal(plain, nn.Conv2d(24, 24, kernel, stride, kernel // 2, groups=24, bias=bias), x)


@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "channels", "channels_last", "bias"), [
    ((1, 1), 3, 1, 1, 16, True, False),    # resnet18's last stage at 32 px: 8 of 9 taps read only padding
    ((2, 2), 3, 1, 1, 16, False, True), ((2, 2), 3, 2, 1, 16, True, False), ((4, 4), 3, 2, 1, 16, True, False),
    ((2, 3), 3, 1, (1, 0), 16, True, True),  # not square, padding differs per axis
    ((3, 3), 5, 2, 2, 16, False, False), ((2, 2), 1, 1, 0, 16, True, False), ((4, 4), 1, 2, 0, 16, False, True),
    ((7, 7), 3, 1, 1, 256, True, False),  # wide channels: the taps also on larger maps
    ((2, 2), 2, 1, 0, 16, True, False),   # even kernel, no padding
])
def test_dense_gradients_equal_autograd_s(size: tuple[int, int], kernel: int, stride: int,
                                          padding: int | tuple[int, int], channels: int, channels_last: bool,
                                          bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Conv2d(channels, 24, kernel, stride, padding, bias=bias)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, channels, *size).contiguous(memory_format=fmt)
    _assert_gradients_equal(plain, nn.Conv2d(channels, 24, kernel, stride, padding, bias=bias), x)


def test_only_the_measured_shapes_take_the_replacement() -> None:
    def takes(conv: nn.Conv2d, side: int, limits=AVX2_LIMITS) -> bool:
        return takes_small_map_grad(conv, torch.empty(1, conv.in_channels, side, side), limits)

    depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    assert takes(depthwise, 4) and not takes(depthwise, 5)
    narrow, wide = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(256, 256, 3, padding=1)
    assert takes(narrow, 2) and not takes(narrow, 4) and not takes(narrow, 8)
    assert takes(wide, 14) and not takes(wide, 15)
    assert takes(nn.Conv2d(64, 64, 3, 2, 1), 4)  # 2 x 2 outputs
    # AVX-512: oneDNN's depthwise gradient is fast, and its dense one loses only up to 2 x 2 outputs
    assert not takes(depthwise, 1, AVX512_LIMITS) and not takes(depthwise, 4, AVX512_LIMITS)
    assert takes(wide, 2, AVX512_LIMITS) and takes(nn.Conv2d(512, 512, 3, padding=1), 1, AVX512_LIMITS)
    assert not takes(wide, 4, AVX512_LIMITS) and takes(nn.Conv2d(128, 256, 3, 2, 1), 4, AVX512_LIMITS)


@pytest.mark.parametrize(("capability", "limits"), [("AVX512", AVX512_LIMITS), ("AVX2", AVX2_LIMITS),
                                                    ("DEFAULT", AVX2_LIMITS)])
def test_the_limits_follow_the_vector_instructions_torch_runs(monkeypatch, capability, limits) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_limits.__wrapped__() == limits


def test_bf16_autocast_on_cpu_keeps_autograd_s_path() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(4, 8, 4, 4, requires_grad=True)
    with small_map_weight_grads(conv):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and conv.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("arch", ["mobilenetv3_small_100", "resnet18"])
def test_only_plain_dense_and_depthwise_convs_switch_and_are_restored(arch: str) -> None:
    model = create_model(arch, 10, 1)
    model.add_module("grouped", nn.Conv2d(8, 8, 3, groups=2))  # neither: stays nn.Conv2d
    model.add_module("dilated", nn.Conv2d(8, 8, 3, dilation=2))
    classes = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)
             and m.dilation == (1, 1) and (m.groups == 1 or m.groups == m.in_channels)]
    with small_map_weight_grads(model) as switched:
        assert switched == len(convs) == len(list(model.modules())) - sum(
            type(m) is not SmallMapGradConv2d for m in model.modules())
        assert type(model.grouped) is nn.Conv2d and type(model.dilated) is nn.Conv2d
        assert list(model.state_dict()) == keys
    assert {name: type(m) for name, m in model.named_modules()} == classes


@pytest.mark.parametrize(("arch", "size"), [("mobilenetv3_small_100", 64), ("resnet18", 32)])
def test_a_training_step_gets_the_same_gradients(arch: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(arch, 10, 1).train().to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    nn.functional.cross_entropy(model(x), y).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.load_state_dict(state)  # batch-norm running statistics as before
    with small_map_weight_grads(model):
        nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_trainer_switches_convs_on_cpu_for_its_steps_only(tmp_path) -> None:
    from accelerate import Accelerator

    from pipeline.config.sections import TrainConfig
    from pipeline.engine.trainer import train

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Flatten(), nn.Linear(64, 3))
    seen: list[type] = []

    def loss_fn(trained: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(type(model[0]))
        return {"loss": trained(batch).logsumexp(1).mean()}

    def batches(start: int) -> list[torch.Tensor]:
        return [torch.randn(2, 4, 4, 4) for _ in range(start, 2)]

    train(Accelerator(cpu=True), model, TrainConfig(epochs=1, warmup_epochs=0.0), 2, 2, batches, loss_fn,
          tmp_path / "state", "test", progress=False)
    assert seen == [SmallMapGradConv2d, SmallMapGradConv2d]
    assert type(model[0]) is nn.Conv2d
