from pathlib import Path

import pytest

from pipeline.config.loading import load_config

from pipeline.config.sections import Config
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
    from teachers.checkpoint import CheckpointMeta, save_checkpoint
    from teachers.models import create_model
    inside = tmp_path / "run" / "distill_x" / "checkpoint"  # a stage of this run: --from could replace it
    save_checkpoint(inside, create_model("test_resnet", 2, 1), CheckpointMeta(
        arch="test_resnet", num_classes=2, in_chans=1, input_size=16, mean=(0.5,), std=(0.5,),
        class_names=("a", "b"), config_hash="x"))
    with pytest.raises(ModelError, match=r"distill.ensemble\[0\]: .* is inside this run directory"):
        check_ensemble(load_config(None, [f"distill.ensemble=[{inside}]"]), RunDir(tmp_path / "run"))
    check_ensemble(load_config(None, [f"distill.ensemble=[{inside}]"]), RunDir(tmp_path / "other-run"))


def test_offline_distillation_refuses_mixup_naming_both_keys():
    # offline logits belong to the clean image: a mixed view would be taught another image's target
    with pytest.raises(ConfigError, match=r"distill: mixup 0.5 needs mode: online"):
        load_config(None, ["distill.mode=offline", "distill.mixup=0.5"])
    assert load_config(None, ["distill.mode=online", "distill.mixup=0.5"]).distill.mixup == 0.5


def test_a_set_value_that_is_not_yaml_is_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^--set teacher\.train\.epochs=\[1,: not valid YAML \(expected .*\)$"):
        load_config(None, ["teacher.train.epochs=[1,"])
    from pipeline.cli import main
    path = write(tmp_path, "seed: 0\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--set", "teacher.train.epochs=[1,"]) == 2
    assert "selftrain: error: --set teacher.train.epochs=[1,: not valid YAML (" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_errors_in_set_values_name_the_set_not_the_file(tmp_path):
    path = write(tmp_path, "seed: 0\nteacher:\n  train:\n    lr: 0.05\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["seed=2", "teacher.train.epochs=abc", "teacher.train.lr=0.1"])
    assert str(err.value) == "--set teacher.train.epochs=abc: teacher.train.epochs: expected an integer, got 'abc'"
    # an error in the file still names the file, whatever is set beside it; a --set still replaces a file value
    bad = write(tmp_path, "teacher:\n  train:\n    epochs: abc\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: teacher.train.epochs: expected an integer, got 'abc'"):
        load_config(bad, ["seed=2"])
    with pytest.raises(ConfigError, match=r"^--set teacher.train.epochs=xyz: .*got 'xyz'"):
        load_config(bad, ["teacher.train.epochs=xyz"])
    assert load_config(bad, ["teacher.train.epochs=4"]).teacher.train.epochs == 4
    # a check of two keys names the --set that broke it
    offline = write(tmp_path, "distill:\n  mode: offline\n")
    with pytest.raises(ConfigError, match=r"^--set distill.mixup=0.5: distill: mixup 0.5 needs mode: online"):
        load_config(offline, ["distill.mixup=0.5"])
    with pytest.raises(ConfigError, match=r"^--set distill.mixup=0.5: distill: mixup 0.5 needs mode: online"):
        load_config(None, ["distill.mode=offline", "distill.mixup=0.5"])
    # a --set of another key of that section is not blamed for the file's mixup
    mixed = write(tmp_path, "distill:\n  mode: offline\n  mixup: 0.2\n")
    with pytest.raises(ConfigError, match=rf"^{mixed}: distill: mixup 0.2 needs mode: online"):
        load_config(mixed, ["distill.alpha=0.2", "distill.export.repeats=10"])
    # an intermediate combination that the last --set makes valid is not refused
    assert load_config(offline, ["distill.mixup=0.5", "distill.mode=online"]).distill.mixup == 0.5
    # the --set of the failing key is named even when a later --set mends another key of the file
    zero = write(tmp_path, "data:\n  labels_per_class: 0\n")
    with pytest.raises(ConfigError, match=r"^--set teacher.train.epochs=-1: teacher.train.epochs: "):
        load_config(zero, ["teacher.train.epochs=-1", "data.labels_per_class=5"])
    # a section misspelt on a --set's path is that --set's, not the file's
    with pytest.raises(ConfigError, match=r"^--set distill.mutal.weight=1: unknown config key 'distill.mutal'"):
        load_config(None, ["distill.mutal.weight=1"])
    typo = write(tmp_path, "distill:\n  mutal:\n    weight: 1\n")
    with pytest.raises(ConfigError, match=rf"^{typo}: unknown config key 'distill.mutal'"):
        load_config(typo, ["distill.mutual.weight=1"])


def test_a_key_given_twice_in_a_config_file_is_refused_with_file_key_and_line(tmp_path):
    path = write(tmp_path, "seed: 0\nteacher:\n  train:\n    epochs: 3\n    epochs: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: line 5: key 'epochs' is given twice in one mapping (first at line 4); "
                              "give each key once")
    with pytest.raises(ConfigError, match=rf"^{path}: line 3: key 'seed' is given twice .*first at line 1"):
        load_config(write(tmp_path, "seed: 0\nteacher: {}\nseed: 1\n"))
    with pytest.raises(ConfigError, match=rf"^{path}: line 1: key 'epochs' is given twice"):
        load_config(write(tmp_path, "teacher: {train: {epochs: 3, epochs: 4}}\n"))
    with pytest.raises(ConfigError, match=r"^--set teacher.train=\{epochs: 1, epochs: 2\}: line 1: key 'epochs'"):
        load_config(None, ["teacher.train={epochs: 1, epochs: 2}"])
    # the same key in two mappings, and a key overriding one merged from an anchor, are fine
    config = load_config(write(tmp_path, "teacher:\n  train: &t {epochs: 3, lr: 0.05}\n"
                                         "student:\n  train:\n    <<: *t\n    epochs: 4\n"))
    assert (config.teacher.train.epochs, config.student.train.epochs, config.student.train.lr) == (3, 4, 0.05)


def test_a_key_given_twice_in_a_compare_config_is_refused(tmp_path):
    from pipeline.experiments.compare_config import load_compare_config
    path = write(tmp_path, "budget: {steps: 5}\naxes:\n  seeds: [0]\n  policy: [s1]\n  seeds: [1]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 5: key 'seeds' is given twice .*first at line 3"):
        load_compare_config(path)


def test_set_values_read_as_written_not_as_yaml_1_1():
    """`channels_last=off` and `mixed_precision=no` are the documented words (YAML 1.1 made them false and
    refused them), 5e-4 is a number, 010 is ten (not octal 8), 1:30 is no number (base-60 90 before)."""
    config = load_config(None, ["runtime.channels_last=off", "runtime.mixed_precision=no", "select.seed=010",
                                "teacher.train.weight_decay=5e-4", "runtime.progress=no"])
    assert (config.runtime.channels_last, config.runtime.mixed_precision, config.select.seed) == ("off", "no", 10)
    assert config.teacher.train.weight_decay == 0.0005 and config.runtime.progress is False
    with pytest.raises(ConfigError, match=r"teacher.train.epochs: expected an integer, got '1:30'"):
        load_config(None, ["teacher.train.epochs=1:30"])
    with pytest.raises(ConfigError, match=r"teacher.train.lr: expected a finite number, got inf"):
        load_config(None, ["teacher.train.lr=.inf"])


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 0\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 text \(byte 0xe9 at offset 13\)"):
        load_config(path)


def test_a_negative_seed_is_refused_with_its_key(tmp_path):
    """It crashed the first training stage in numpy's seeding, naming no key."""
    for text, key in (("seed: -1\n", "seed"), ("data:\n  seed: -2\n", "data.seed"), ("select:\n  seed: -3\n", "select.seed")):
        with pytest.raises(ConfigError, match=rf"{key}: -\d is out of range; it must be >= 0"):
            load_config(write(tmp_path, text))
    from pipeline.config.schema import from_dict
    from pipeline.experiments.compare_config import CompareConfig, check
    for axes, message in (({"seeds": [0, -1]}, r"axes.seeds: \[0, -1\]: each must be >= 0"),
                          ({"labels_per_class": [0, 20]}, r"axes.labels_per_class: \[0, 20\]: each must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            check(from_dict(CompareConfig, {"axes": axes}))


def test_the_saved_config_reads_back_the_same(tmp_path):
    """Strings YAML 1.2 reads as numbers ('1e5', '+.5') were written unquoted: RUN/config.yaml was refused."""
    from pipeline.config.loading import config_to_yaml

    config = load_config(None, ["data.path='1e5'", "data.classes=['+.5', 'off', '010', 'shirt']",
                                "teacher.model.init='1E3'"])
    assert load_config(write(tmp_path, config_to_yaml(config))) == config


def test_one_student_listed_twice_is_refused_naming_both_entries():
    """Two entries of one arch and size make one stage name: a traceback from the graph before."""
    with pytest.raises(ConfigError, match=r"students\[0\] and students\[1\] are both resnet18 at 32 px"):
        load_config(None, ["distill.students=[{arch: resnet18, input_size: 32}, "
                           "{arch: resnet18, input_size: 32, drop_rate: 0.1}]"])
    assert len(load_config(None, ["distill.students=[{arch: resnet18, input_size: 32}, "
                                  "{arch: resnet18, input_size: 64}]"]).distill.students) == 2


def test_a_list_item_in_set_is_refused_with_the_whole_list_form():
    """`distill.students[0].arch=...` blamed the config file for an unknown key."""
    for key in ("distill.students[0].arch", "distill.students.0.arch"):
        with pytest.raises(ConfigError, match=r"--set names a key, not a list item; give the list whole"):
            load_config(None, [f"{key}=resnet18"])


def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(monkeypatch):
    """torch's is_bf16_supported() counts emulation, so V100/T4 cards got bf16 and fp16 was never chosen."""
    import torch

    from pipeline.config.sections import RuntimeConfig
    from pipeline.engine.runtime import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in ((False, "fp16"), (True, "bf16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert mixed_precision(RuntimeConfig()) == expected


def test_a_section_given_to_set_keeps_the_files_other_keys_and_null_is_refused(tmp_path):
    """`--set teacher.train={epochs: 5}` replaced the file's whole section: its policy, lr... fell back to the
    built-in defaults without a word. A mapping now sets the keys it names; null for a section is refused."""
    path = write(tmp_path, "teacher:\n  train:\n    policy: s4\n    lr: 0.3\n    epochs: 9\n")
    config = load_config(path, ["teacher.train={epochs: 5}", "teacher={model: {arch: resnet34}}"])
    assert (config.teacher.train.epochs, config.teacher.train.policy, config.teacher.train.lr) == (5, "s4", 0.3)
    assert config.teacher.model.arch == "resnet34"
    for item in ("teacher=null", "teacher.train=null"):
        with pytest.raises(ConfigError, match=rf"--set {item}: '{item[:-5]}' is a section.*--set {item[:-5]}\.[\w.]+="):
            load_config(path, [item])
    with pytest.raises(ConfigError, match=r"--set teacher=\{trian: \{\}\}: unknown config key 'teacher.trian'"):
        load_config(path, ["teacher={trian: {}}"])
    assert load_config(path, ["data.webdataset=null", "distill.teacher=null"]).data.webdataset is None  # values
    for empty in ("teacher.train={}", "teacher={}"):  # an empty mapping leaves the section as the file has it
        kept = load_config(path, [empty]).teacher.train
        assert (kept.epochs, kept.policy, kept.lr) == (9, "s4", 0.3), empty
    # an optional section (null turns it off) merges too, and so do the sections below one
    shards = write(tmp_path, "data:\n  source: webdataset\n  webdataset: {labeled: [/x/a.tar], test: [/x/t.tar], "
                             "unlabeled: [/x/u.tar], label_key: 'json:label'}\n"
                             "pretrain:\n  data: {source: fashion-mnist, path: /fm, labels_per_class: 50}\n")
    config = load_config(shards, ["data.webdataset={labeled: [/y/b.tar]}", "pretrain.data={labels_per_class: 20}"])
    assert (config.data.webdataset.labeled, config.data.webdataset.test) == (("/y/b.tar",), ("/x/t.tar",))
    assert config.data.webdataset.label_key == "json:label"
    assert (config.pretrain.data.path, config.pretrain.data.labels_per_class) == ("/fm", 20)


def test_set_changes_only_the_key_it_names_when_sections_share_a_yaml_anchor(tmp_path):
    """PyYAML gives every alias of an anchor one mapping: `--set student.train.epochs=9` trained the teacher for
    9 epochs too, and a << merge shared the same way."""
    path = write(tmp_path, "teacher:\n  train: &train {epochs: 2, lr: 0.05}\n"
                           "student:\n  train: *train\n"
                           "pseudo_label: &pl {batch_size: 100}\n")
    config = load_config(path, ["student.train.epochs=9", "teacher.train={lr: 0.3}"])
    assert (config.teacher.train.epochs, config.student.train.epochs) == (2, 9)
    assert (config.teacher.train.lr, config.student.train.lr) == (0.3, 0.05)
    merged = write(tmp_path, "teacher: &t\n  train: {epochs: 2, lr: 0.05}\nstudent:\n  <<: *t\n")
    config = load_config(merged, ["student.train.lr=0.5"])
    assert (config.teacher.train.lr, config.student.train.lr) == (0.05, 0.5)


def test_a_set_value_cut_short_by_a_yaml_comment_is_refused():
    """`--set 'data.path=/data/run #2'` read as /data/run: YAML took the rest for a comment."""
    with pytest.raises(ConfigError, match=r"' #' starts a YAML comment.*--set 'data.path=\"/data/run #2\"'"):
        load_config(None, ["data.path=/data/run #2"])
    assert load_config(None, ['data.path="/data/run #2"']).data.path == "/data/run #2"
    assert load_config(None, ["data.path=/data/run#2"]).data.path == "/data/run#2"
    assert load_config(None, ['data.classes=["Item #1", "Item #2"]']).data.classes == ("Item #1", "Item #2")
    with pytest.raises(ConfigError, match=r"' #' starts a YAML comment.*quote the strings that hold it"):
        load_config(None, ["data.classes=[a, b] #c"])
