"""Growing a deeper student from its teacher's checkpoint (resnet18 -> resnet34) keeps the teacher's function."""

import pytest
import torch

from teachers.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from teachers.grow import grow_from
from teachers.models import create_model


def saved(tmp_path, arch: str) -> CheckpointMeta:
    torch.manual_seed(1)
    model = create_model(arch, 10, 1)
    # Trained-like statistics, so the check below is not passed by an all-zero network.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_var.uniform_(0.5, 2.0)
    meta = CheckpointMeta(arch=arch, num_classes=10, in_chans=1, input_size=16, mean=(0.3,), std=(0.3,),
                          class_names=tuple(str(i) for i in range(10)), config_hash="x")
    save_checkpoint(tmp_path, model, meta)
    return read_meta(tmp_path)


def test_deeper_student_starts_as_its_teacher(tmp_path):
    meta = saved(tmp_path, "resnet18")
    student = create_model("resnet34", 10, 1, drop_rate=0.3, drop_path_rate=0.1)
    growth = grow_from(student, tmp_path, meta)
    teacher, _ = load_checkpoint(tmp_path)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(student.eval()(x), teacher.eval()(x), atol=1e-5, rtol=1e-5)
    assert growth.loaded == len(teacher.state_dict())
    assert growth.fresh == len(student.state_dict()) - growth.loaded > 0
    assert student.layer3[5].bn2.weight.abs().sum() == 0  # a fresh block: identity until trained


def test_growth_into_another_family_or_a_smaller_model_is_refused(tmp_path):
    meta = saved(tmp_path, "resnet18")
    with pytest.raises(CheckpointError, match=r"model.init .*cannot grow 'resnet18'.*no counterpart"):
        grow_from(create_model("mobilenetv3_small_100", 10, 1), tmp_path, meta)
    bigger = tmp_path / "r34"
    bigger.mkdir()
    meta34 = saved(bigger, "resnet34")
    with pytest.raises(CheckpointError, match="cannot grow 'resnet34'.*no counterpart"):
        grow_from(create_model("resnet18", 10, 1), bigger, meta34)


def test_growth_that_changes_the_function_is_refused(tmp_path):
    meta = saved(tmp_path, "resnet18")
    student = create_model("resnet34", 10, 1)
    student.layer2[3].bn2.weight.data.fill_(1.0)  # an extra block that is not the identity
    with pytest.raises(CheckpointError, match="does not compute the checkpoint's function"):
        grow_from(student, tmp_path, meta)


def test_growth_for_other_classes_keeps_the_features_and_starts_a_new_head(tmp_path):
    from pipeline.engine.init import InitSource, apply_init
    meta = saved(tmp_path, "resnet18")
    torch.manual_seed(5)
    student = create_model("resnet34", 10, 1)
    fresh_head = student.fc.weight.detach().clone()
    others = tuple(f"other {i}" for i in range(10))  # the checkpoint's classes are '0'..'9'
    outcome = apply_init(student, InitSource(str(tmp_path), path=tmp_path), "resnet34", others, in_chans=1)
    teacher, _ = load_checkpoint(tmp_path)
    assert outcome.growth.head_reinitialised and outcome.metrics()["head_reinitialised"]
    assert torch.equal(student.fc.weight, fresh_head) and not torch.equal(student.fc.weight, teacher.fc.weight)
    x = torch.randn(3, 1, 16, 16)
    features = [m.eval().forward_head(m.forward_features(x), pre_logits=True) for m in (student, teacher)]
    torch.testing.assert_close(features[0], features[1], atol=1e-5, rtol=1e-5)
    five = create_model("resnet34", 5, 1)  # another class count grows too (it was refused on the head's shape)
    grown = apply_init(five, InitSource(str(tmp_path), path=tmp_path), "resnet34", tuple("abcde"), 1).growth
    assert grown.head_reinitialised and grown.loaded == len(teacher.state_dict()) - 2
