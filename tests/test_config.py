from pathlib import Path

import pytest

from pipeline.config.sections import Config, load_config
from pipeline.config.schema import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_config_loads():
    config = load_config(Path(__file__).parents[1] / "configs" / "fashion_mnist.yaml")
    assert isinstance(config, Config)
    assert config.teacher.train.policy == "s1"


def test_misspelled_key_is_rejected_with_suggestion(tmp_path):
    path = write(tmp_path, "teacher:\n  train:\n    epocs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "teacher.train.epocs" in message
    assert "teacher.train.epochs" in message
    assert str(path) in message


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'teacher'"):
        load_config(write(tmp_path, "teachr: {}\n"))


def test_wrong_type_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.train.epochs: expected an integer, got '10'"):
        load_config(write(tmp_path, "teacher:\n  train:\n    epochs: '10'\n"))
    with pytest.raises(ConfigError, match="teacher.train.lr: expected a number"):
        load_config(write(tmp_path, "teacher:\n  train:\n    lr: fast\n"))


def test_out_of_range_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.train.label_smoothing: 1.5 is out of range"):
        load_config(write(tmp_path, "teacher:\n  train:\n    label_smoothing: 1.5\n"))
    with pytest.raises(ConfigError, match="teacher.train.optimizer: 'adam' is not one of"):
        load_config(write(tmp_path, "teacher:\n  train:\n    optimizer: adam\n"))


def test_bad_policy_string_rejected(tmp_path):
    with pytest.raises(ConfigError, match="policy"):
        load_config(write(tmp_path, "teacher:\n  train:\n    policy: s9\n"))


def test_set_overrides(tmp_path):
    config = load_config(write(tmp_path, "seed: 1\n"), ["teacher.train.epochs=3", "teacher.model.arch=resnet34",
                                                        "runtime.log_with=null", "teacher.train.lr=0.05"])
    assert config.teacher.train.epochs == 3
    assert config.teacher.model.arch == "resnet34"
    assert config.teacher.train.lr == 0.05
    assert config.seed == 1
    with pytest.raises(ConfigError, match="teacher.train.epoch"):
        load_config(None, ["teacher.train.epoch=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["teacher.train.epochs"])


def test_config_is_frozen():
    config = load_config(None)
    with pytest.raises(Exception):
        config.seed = 3  # type: ignore[misc]


def test_lists_and_mappings_of_sections_are_checked_item_by_item():
    from dataclasses import dataclass, field

    from pipeline.config.schema import bounds, from_dict, to_dict

    @dataclass(frozen=True)
    class Student:
        arch: str = "mobilenetv3_small_100"
        input_size: int = field(default=64, metadata=bounds(ge=8))

    @dataclass(frozen=True)
    class Grid:
        students: tuple[Student, ...] = ()
        seeds: tuple[int, ...] = (0,)
        budgets: dict[str, int] = field(default_factory=dict)

    grid = from_dict(Grid, {"students": [{"arch": "efficientnet_lite0"}, {"input_size": 32}],
                            "seeds": [0, 1], "budgets": {"s1": 100}})
    assert grid.students == (Student("efficientnet_lite0"), Student(input_size=32))
    assert grid.seeds == (0, 1) and grid.budgets == {"s1": 100}
    assert to_dict(grid) == {"students": [{"arch": "efficientnet_lite0", "input_size": 64},
                                          {"arch": "mobilenetv3_small_100", "input_size": 32}],
                             "seeds": [0, 1], "budgets": {"s1": 100}}
    with pytest.raises(ConfigError, match=r"unknown config key 'students\[1\].arh'.*Did you mean 'students\[1\].arch'"):
        from_dict(Grid, {"students": [{}, {"arh": "x"}]})
    with pytest.raises(ConfigError, match=r"students\[0\].input_size: 4 is out of range"):
        from_dict(Grid, {"students": [{"input_size": 4}]})
    with pytest.raises(ConfigError, match=r"seeds\[1\]: expected an integer"):
        from_dict(Grid, {"seeds": [0, "one"]})
    with pytest.raises(ConfigError, match=r"budgets.s1: expected an integer"):
        from_dict(Grid, {"budgets": {"s1": 1.5}})
    with pytest.raises(ConfigError, match=r"seeds: expected a list"):
        from_dict(Grid, {"seeds": 3})


def test_offline_distillation_refuses_an_ensemble_teacher_and_preflight_names_a_bad_member(tmp_path):
    # offline logits are the sidecars of one teacher: there is nothing to average them with
    with pytest.raises(ConfigError, match=r"distill: ensemble needs mode: online"):
        load_config(None, ["distill.mode=offline", f"distill.ensemble=[{tmp_path}]"])
    for bad in ('[""]', f"[{tmp_path}, {tmp_path}]"):  # an empty name; a member counted twice
        with pytest.raises(ConfigError, match=r"distill: ensemble .*each member a checkpoint directory, named once"):
            load_config(None, [f"distill.ensemble={bad}"])
    from pipeline.core.rundir import RunDir
    from pipeline.stages.preflight import check_ensemble
    from teachers.models import ModelError
    config = load_config(None, [f"distill.ensemble=[{tmp_path}]"])
    assert config.distill.ensemble == (str(tmp_path),)
    with pytest.raises(ModelError, match=rf"distill.ensemble\[0\]: {tmp_path} is not a checkpoint directory"):
        check_ensemble(config, RunDir(tmp_path / "run"))
    inside = tmp_path / "run" / "distill_x" / "checkpoint"  # a stage of this run: --from could replace it
    inside.mkdir(parents=True)
    (inside / "meta.json").write_text("{}")
    with pytest.raises(ModelError, match=r"distill.ensemble\[0\]: .* is inside this run directory"):
        check_ensemble(load_config(None, [f"distill.ensemble=[{inside}]"]), RunDir(tmp_path / "run"))
    check_ensemble(load_config(None, [f"distill.ensemble=[{inside}]"]), RunDir(tmp_path / "other-run"))


def test_offline_distillation_refuses_mixup_naming_both_keys():
    # offline logits belong to the clean image: a mixed view would be taught another image's target
    with pytest.raises(ConfigError, match=r"distill: mixup 0.5 needs mode: online"):
        load_config(None, ["distill.mode=offline", "distill.mixup=0.5"])
    assert load_config(None, ["distill.mode=online", "distill.mixup=0.5"]).distill.mixup == 0.5
