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


def test_same_tensors_give_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders its metadata by a per-process hash; the checkpoint must not."""
    import subprocess
    import sys
    code = ("import sys, torch; from pathlib import Path; from teachers.checkpoint import stable_safetensors; "
            "torch.manual_seed(0); s = {'w': torch.randn(4, 3), 'b': torch.arange(3)}; "
            "Path(sys.argv[1]).write_bytes(stable_safetensors(s, {'arch': 'x', 'format': 'f', 'z': 'y'}))")
    blobs = []
    for i in range(4):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True)
        blobs.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(blob == blobs[0] for blob in blobs)


def test_checkpoint_loads_through_timm_local_dir_with_its_preprocessing(tmp_path):
    import timm
    import torch

    from teachers.checkpoint import CheckpointMeta, save_checkpoint
    from teachers.models import create_model

    model = create_model("resnet18", 3, 1).eval()
    meta = CheckpointMeta("resnet18", 3, 1, 40, (0.25,), (0.5,), ("a", "b", "c"), "hash")
    save_checkpoint(tmp_path / "ckpt", model, meta)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
    x = torch.randn(2, 1, 40, 40)
    assert torch.equal(model(x), loaded(x))
    data_config = timm.data.resolve_data_config(model=loaded)
    assert data_config["input_size"] == (1, 40, 40)
    assert tuple(data_config["mean"]) == (0.25,) and tuple(data_config["std"]) == (0.5,)
    assert data_config["crop_pct"] == 1.0


def test_unknown_architecture_names_the_closest_timm_names():
    with pytest.raises(ModelError, match=r"unknown timm architecture 'resnet19'; did you mean resnet18"):
        create_model("resnet19", 10, 1)
