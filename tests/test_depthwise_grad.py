"""The shift weight gradient of depthwise convolutions (pipeline/engine/depthwise.py) equals autograd's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.engine.depthwise import ShiftGradDepthwiseConv2d, shift_grad_depthwise
from teachers.models import create_model


@pytest.mark.parametrize(("side", "kernel", "stride", "channels_last", "bias"), [
    (2, 5, 1, True, False), (4, 5, 1, False, False), (4, 5, 2, True, False), (3, 3, 2, False, True),
    (4, 3, 1, True, True), (1, 3, 1, False, False), (2, 1, 1, True, False),
])
def test_gradients_equal_autograd_s(side: int, kernel: int, stride: int, channels_last: bool, bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Conv2d(24, 24, kernel, stride, kernel // 2, groups=24, bias=bias)
    shifted = nn.Conv2d(24, 24, kernel, stride, kernel // 2, groups=24, bias=bias)
    shifted.load_state_dict(plain.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, 24, side, side).contiguous(memory_format=fmt)
    x_plain, x_shifted = x.clone().requires_grad_(), x.clone().requires_grad_()
    with shift_grad_depthwise(shifted) as switched:
        assert switched == 1 and type(shifted) is ShiftGradDepthwiseConv2d
        out = shifted(x_shifted)
    reference = plain(x_plain)
    assert torch.equal(out, reference)  # the forward pass is the same conv2d call
    grad = torch.randn_like(reference)
    reference.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x_shifted.grad, x_plain.grad)
    torch.testing.assert_close(shifted.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(shifted.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_on_cpu_keeps_autograd_s_path() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(4, 8, 4, 4, requires_grad=True)
    with shift_grad_depthwise(conv):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and conv.weight.grad is not None and x.grad is not None


def test_only_plain_depthwise_convs_switch_and_are_restored() -> None:
    model = create_model("mobilenetv3_small_100", 10, 1)
    classes = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    with shift_grad_depthwise(model) as switched:
        assert switched == len(depthwise) > 0
        assert all(type(m) is ShiftGradDepthwiseConv2d for m in depthwise)
        assert list(model.state_dict()) == keys
    assert {name: type(m) for name, m in model.named_modules()} == classes


def test_a_training_step_of_mobilenetv3_gets_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_100", 10, 1).train().to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    nn.functional.cross_entropy(model(x), y).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.load_state_dict(state)  # batch-norm running statistics as before
    with shift_grad_depthwise(model):
        nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_trainer_switches_depthwise_convs_on_cpu_for_its_steps_only(tmp_path) -> None:
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
    assert seen == [ShiftGradDepthwiseConv2d, ShiftGradDepthwiseConv2d]
    assert type(model[0]) is nn.Conv2d
