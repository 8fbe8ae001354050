import pytest
import timm
import torch
from safetensors.torch import load_file

from teachers.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from teachers.models import ModelError, create_model


def meta(arch="resnet18", num_classes=10, in_chans=1):
    return CheckpointMeta(arch=arch, num_classes=num_classes, in_chans=in_chans, input_size=32,
                          mean=(0.28,), std=(0.35,), class_names=tuple(f"c{i}" for i in range(num_classes)),
                          config_hash="abc")


def test_round_trip_into_plain_timm(tmp_path):
    model = create_model("resnet18", 10, 1).to(memory_format=torch.channels_last).eval()
    save_checkpoint(tmp_path, model, meta())
    saved = read_meta(tmp_path)
    plain = timm.create_model(saved.arch, num_classes=saved.num_classes, in_chans=saved.in_chans).eval()
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(plain(x), model(x))
    loaded, loaded_meta = load_checkpoint(tmp_path, arch="resnet18", num_classes=10)
    assert loaded_meta.mean == (0.28,) and loaded_meta.class_names[0] == "c0"
    torch.testing.assert_close(loaded.eval()(x), model(x))


def test_mismatched_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path, create_model("resnet18", 10, 1), meta())
    with pytest.raises(CheckpointError, match="architecture is 'resnet18', but 'resnet34'"):
        load_checkpoint(tmp_path, arch="resnet34")
    with pytest.raises(CheckpointError, match="has 10 classes, the data has 5"):
        load_checkpoint(tmp_path, num_classes=5)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_unknown_arch_is_named():
    with pytest.raises(ModelError, match="unknown timm architecture 'resnet19x'"):
        create_model("resnet19x", 10, 1)
