"""Starting weights from a weights file or timm's published weights (local cache only, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from teachers.init_sources import (InitError, InitReport, load_matching, load_state_dict_file, timm_arch,
                                   timm_pretrained_state)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, and empty caches unless a test fills them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_empty"))


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _check_resnet_load(path: Path, source_model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    target = timm.create_model("resnet18", num_classes=5)
    report = load_matching(target, load_state_dict_file(path), str(path))
    loaded, source = target.state_dict(), source_model.state_dict()
    for name in loaded:
        if not name.startswith("fc."):
            torch.testing.assert_close(loaded[name], source[name], msg=name)
    assert "fc.weight: source shape (10, 512) vs model (5, 512)" in report.skipped
    assert "fc.bias: source shape (10,) vs model (5,)" in report.skipped
    assert len(report.skipped) == 2 and report.missing == ()
    assert report.loaded == len(source) - 2
    assert report.head_reinitialised
    assert "classifier re-initialised for the target classes" in report.describe()
    assert report.source == str(path)


def test_safetensors_file_into_fewer_classes(tmp_path: Path, source_model: torch.nn.Module) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_state(source_model), str(path))
    _check_resnet_load(path, source_model)


def test_pt_file_into_fewer_classes(tmp_path: Path, source_model: torch.nn.Module) -> None:
    path = tmp_path / "model.pt"
    torch.save(_state(source_model), path)
    _check_resnet_load(path, source_model)


def test_wrapped_ddp_checkpoint(tmp_path: Path, source_model: torch.nn.Module) -> None:
    path = tmp_path / "last.ckpt"
    wrapped = {f"module.{k}": v for k, v in _state(source_model).items()}
    torch.save({"state_dict": wrapped, "epoch": 3, "note": "x"}, path)
    state = load_state_dict_file(path)
    assert "conv1.weight" in state and not any(k.startswith("module.") for k in state)
    _check_resnet_load(path, source_model)


def test_same_shapes_load_everything(tmp_path: Path, source_model: torch.nn.Module) -> None:
    target = timm.create_model("resnet18", num_classes=10)
    report = load_matching(target, _state(source_model), "mem")
    assert report.skipped == () and report.missing == () and not report.head_reinitialised
    assert "re-initialised" not in report.describe()


def test_describe_shortens_long_lists() -> None:
    report = InitReport("x", 1, tuple(f"t{i}: not in the model" for i in range(25)), (), False)
    text = report.describe()
    assert "t9: not in the model" in text and "t10:" not in text and "and 15 more" in text


def test_wrong_architecture_is_refused() -> None:
    other = _state(timm.create_model("mobilenetv3_small_050", num_classes=5))
    with pytest.raises(InitError, match=r"no weights in other.pt fit ResNet.*conv_stem.weight.*conv1.weight"):
        load_matching(timm.create_model("resnet18", num_classes=5), other, "other.pt")


def test_missing_and_garbage_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(InitError, match="nothing.safetensors: init weights file does not exist"):
        load_state_dict_file(tmp_path / "nothing.safetensors")
    for name in ("junk.safetensors", "junk.pth"):
        (tmp_path / name).write_bytes(b"not weights at all" * 10)
        with pytest.raises(InitError, match=name):
            load_state_dict_file(tmp_path / name)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(InitError, match="w.txt: unknown weights format"):
        load_state_dict_file(tmp_path / "w.txt")
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(InitError, match="empty.pt: holds no tensors"):
        load_state_dict_file(tmp_path / "empty.pt")


def test_uncached_timm_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(InitError) as info:
        timm_pretrained_state("resnet18.a1_in1k")
    message = str(info.value)
    assert "'resnet18.a1_in1k' are not in the local cache" in message
    assert str(tmp_path / "hf_empty") in message and str(tmp_path / "torch_empty") in message
    assert "timm.create_model('resnet18.a1_in1k', pretrained=True)" in message and "HF_HUB_CACHE" in message


def test_cached_timm_weights_from_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           source_model: torch.nn.Module) -> None:
    # huggingface_hub's layout: <cache>/models--<org>--<name>/refs/main -> commit; snapshots/<commit>/<file>
    cache, commit = tmp_path / "hf", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(_state(source_model), str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for name in ("resnet18.a1_in1k", "resnet18"):  # the bare architecture means timm's default tag
        state = timm_pretrained_state(name)
        assert state.keys() == source_model.state_dict().keys()
        for key, value in source_model.state_dict().items():
            torch.testing.assert_close(state[key], value, msg=key)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "hf").rename(tmp_path / "hub")
    assert timm_pretrained_state("resnet18.a1_in1k").keys() == source_model.state_dict().keys()
    assert timm_arch("resnet18.a1_in1k") == "resnet18"


def test_url_only_weights_from_torch_hub_cache(tmp_path: Path, source_model: torch.nn.Module) -> None:
    cfg = timm.models.get_pretrained_cfg("legacy_seresnet18.in1k")
    assert cfg.url and not cfg.hf_hub_id
    checkpoints = tmp_path / "torch_empty" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(_state(source_model), checkpoints / Path(cfg.url).name)
    assert timm_pretrained_state("legacy_seresnet18.in1k").keys() == source_model.state_dict().keys()


def test_unknown_timm_name_suggests_close_ones() -> None:
    with pytest.raises(InitError, match=r"'resnet18\.a1_in1kk' is not a timm pretrained.*did you mean.*resnet18\.a1_in1k"):
        timm_pretrained_state("resnet18.a1_in1kk")
    with pytest.raises(InitError, match="did you mean.*resnet18"):
        timm_pretrained_state("resnet19.a1_in1k")
