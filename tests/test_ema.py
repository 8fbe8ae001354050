"""Weight moving average: TF-style warm-up of the decay, floats averaged, integers copied, exact state."""

import pytest
import torch

from pipeline.engine.ema import WeightEma
from pipeline.core.rundir import RunDir
from pipeline.engine.init import resolve_init
from teachers.models import ModelError


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_decay_warms_up_like_tensorflow_num_updates():
    ema = WeightEma(small_model(), decay=0.999)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(100) == pytest.approx(101 / 110)
    assert ema.decay_at(100_000) == 0.999


def test_update_averages_floats_and_copies_integer_buffers():
    model = small_model()
    ema = WeightEma(model, decay=0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()
    model(torch.randn(8, 3))  # moves running stats, bumps num_batches_tracked
    ema.update(model)
    d = ema.decay_at(1)
    now = model.state_dict()
    torch.testing.assert_close(ema.shadow["0.weight"], d * start["0.weight"] + (1 - d) * now["0.weight"])
    torch.testing.assert_close(ema.shadow["1.running_mean"],
                               d * start["1.running_mean"] + (1 - d) * now["1.running_mean"])
    assert ema.shadow["1.num_batches_tracked"] == 1


def test_state_round_trip_and_copy_to():
    model = small_model()
    ema = WeightEma(model, decay=0.9)
    with torch.no_grad():
        model[0].bias.add_(2.0)
    ema.update(model)
    other = WeightEma(small_model(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    target = small_model()
    other.copy_to(target)
    torch.testing.assert_close(target[0].bias, ema.shadow["0.bias"])


def test_init_teacher_resolves_to_the_round_teacher(tmp_path):
    run = RunDir(tmp_path / "run")
    assert resolve_init("teacher", tmp_path, run).path == tmp_path
    assert resolve_init(None, tmp_path, run).is_random
    assert resolve_init(str(tmp_path / "ckpt"), None, run).path == tmp_path / "ckpt"
    assert resolve_init("pretrain", None, run).path == run.checkpoint_dir("pretrain")
    assert resolve_init("timm:resnet18.a1_in1k", None, run).timm_name == "resnet18.a1_in1k"
    with pytest.raises(ModelError, match="only applies to student stages"):
        resolve_init("teacher", None, run)
