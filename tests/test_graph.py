"""The declared stage graph: names, kinds, needs, teachers, --only/--from selection."""

import hashlib
import json

import pytest

from pipeline.config.loading import load_config
from pipeline.core.rundir import RunDirError
from pipeline.stages.graph import build_graph


def graph(*overrides):
    return build_graph(load_config(None, list(overrides)))


def test_two_rounds_chain_each_student_into_the_next_round():
    g = graph("student.rounds=2")
    assert g.names == ["data", "teacher", "pseudo_label_r1", "select_r1", "student_r1",
                       "pseudo_label_r2", "select_r2", "student_r2", "report"]
    r2 = g.get("student_r2")
    assert (r2.kind, r2.round, r2.teacher, r2.labels, r2.selection) == (
        "student", 2, "student_r1", "pseudo_label_r2", "select_r2")
    assert g.get("pseudo_label_r2").teacher == "student_r1"
    assert [s.name for s in g.of_kind("teacher", "student")] == ["teacher", "student_r1", "student_r2"]
    assert not g.get("report").fingerprinted and g.get("teacher").fingerprinted


def test_zero_rounds_stop_after_selection():
    assert graph("student.rounds=0").names == ["data", "teacher", "pseudo_label_r1", "select_r1", "report"]


def test_from_selects_the_stage_and_everything_downstream():
    g = graph("student.rounds=2")
    assert [s.name for s in g.select(None, "student_r1")] == ["student_r1", "pseudo_label_r2", "select_r2",
                                                             "student_r2", "report"]
    assert [s.name for s in g.select("select_r1", None)] == ["select_r1"]
    assert len(g.select(None, None)) == len(g.stages)


def test_unknown_or_conflicting_selection_is_named():
    g = graph()
    with pytest.raises(RunDirError, match=r"--only 'studnet_r1': unknown stage; stages are data, teacher"):
        g.select("studnet_r1", None)
    with pytest.raises(RunDirError, match="either --only or --from"):
        g.select("teacher", "teacher")


PRETRAIN = ("pretrain.data={source: fashion-mnist}", "teacher.model.init=pretrain", "student.rounds=0",
            "distill.students=[{arch: test_resnet, input_size: 16, init: pretrain}]")


def test_a_distilled_student_started_from_pretraining_is_redone_with_it():
    g = graph(*PRETRAIN)
    assert "pretrain" in g.get("distill_test_resnet").needs
    assert "distill_test_resnet" in [s.name for s in g.select(None, "pretrain")]
    peer = graph("ssl_pretrain.enabled=true", "student.rounds=0", "distill.students=[{arch: test_resnet}]",
                 "distill.mutual.weight=1", "distill.mutual.peer={arch: test_resnet, init: ssl_pretrain}")
    assert "ssl_pretrain" in peer.get("distill_test_resnet").needs  # the mutual-learning peer starts from it


@pytest.mark.parametrize("where, init, message", [
    ("teacher.model", "pretrain", 'teacher.model.init is "pretrain" but the config has no pretrain.data'),
    ("student.model", "ssl_pretrain", 'student.model.init is "ssl_pretrain" but ssl_pretrain.enabled is false'),
    ("distill", "pretrain", r'distill.students\[0\].init is "pretrain" but the config has no pretrain.data'),
    ("distill", "teacher", r'distill.students\[0\].init "teacher": a distilled student does not start'),
    ("teacher.model", "teacher", r'teacher.model.init "teacher": only a student starts from its teacher'),
    ("peer", "ssl_pretrain", r'distill.mutual.peer.init is "ssl_pretrain" but ssl_pretrain.enabled is false'),
])
def test_an_init_naming_a_stage_the_config_leaves_out_is_refused_before_anything_runs(where, init, message):
    from pipeline.stages.preflight import check_models
    from teachers.models import ModelError
    overrides = {"distill": [f"distill.students=[{{arch: test_resnet, input_size: 16, init: {init}}}]"],
                 "peer": ["distill.students=[{arch: test_resnet, input_size: 16}]", "distill.mutual.weight=1",
                          f"distill.mutual.peer={{arch: test_resnet, input_size: 16, init: {init}}}"]}
    config = load_config(None, overrides.get(where, [f"{where}.init={init}"]) + ["student.rounds=1",
                                                                                "teacher.model.arch=test_resnet"])
    build_graph(config)  # the graph leaves the need out (it raised a bare ValueError before preflight could speak)
    with pytest.raises(ModelError, match=message):
        check_models(config)


@pytest.mark.parametrize("override, message", [
    ("student.model.arch=densenet121", r"student.model.drop_path_rate is 0.1, and densenet121 has no stochastic "
                                       r"depth; set student.model.drop_path_rate=0"),
    ("distill.students=[{arch: shufflenet_v2_x0_5, input_size: 32, drop_path_rate: 0.1}]",
     r"distill.students\[0\].drop_path_rate is 0.1, and shufflenet_v2_x0_5 has no stochastic depth"),
    ("distill={students: [{arch: test_resnet, input_size: 64}], "
     "mutual: {weight: 1.0, peer: {arch: vgg11, input_size: 64, drop_path_rate: 0.2}}}",
     r"distill.mutual.peer.drop_path_rate is 0.2, and vgg11 has no stochastic depth"),
])
def test_stochastic_depth_on_a_model_without_it_is_refused_before_the_teacher_trains(override, message):
    """The student's default drop_path_rate (0.1) stopped `student_r1` after the teacher and pseudo-labels."""
    from pipeline.stages.preflight import check_models
    from teachers.models import ModelError
    config = load_config(None, [override, "student.rounds=1"])
    with pytest.raises(ModelError, match=message):
        check_models(config)
    check_models(load_config(None, ["student.model.arch=densenet121", "student.model.drop_path_rate=0"]))


def test_export_names_a_given_distill_teacher_apart_from_the_runs_own_teacher(tmp_path):
    """`distill.teacher` DIR was exported and tabled as `teacher`, the name of the run's own teacher stage."""
    from pipeline.core.rundir import RunDir
    from pipeline.stages.base import StageContext
    from pipeline.stages.export import exported_models

    config = load_config(None, [f"distill.teacher={tmp_path / 'given'}", "student.rounds=1",
                                "distill.students=[{arch: test_resnet, input_size: 16}]"])
    graph = build_graph(config)
    ctx = StageContext(config, RunDir(tmp_path / "run"), None, graph)  # type: ignore[arg-type]
    names = [name for name, _ in exported_models(ctx, graph.get("export"))]
    assert names[0] == "distill_teacher" and "teacher" not in names
    assert exported_models(ctx, graph.get("export"))[0][1] == tmp_path / "given"
    own = load_config(None, ["student.rounds=1", "distill.students=[{arch: test_resnet, input_size: 16}]"])
    assert exported_models(StageContext(own, RunDir(tmp_path / "run"), None, build_graph(own)),  # type: ignore[arg-type]
                           build_graph(own).get("export"))[0][0] == "student_r1"


def test_calibration_without_a_holdout_is_refused_before_the_teacher_trains(tmp_path):
    from pipeline.core.rundir import RunDir, RunDirError
    from pipeline.stages.preflight import check_holdout_for_calibration

    with pytest.raises(RunDirError, match="select.calibrate is true but the data has no holdout split"):
        check_holdout_for_calibration(load_config(None, ["select.calibrate=true"]), RunDir(tmp_path / "run"), False)
    check_holdout_for_calibration(load_config(None, ["select.calibrate=true", "data.holdout_per_class=2"]),
                                  RunDir(tmp_path / "run"), False)


@pytest.mark.parametrize("student, message", [
    ("{arch: convnext_atto, input_size: 16}", r"distill.students\[0\].input_size 16: convnext_atto cannot take 16 px"),
    ("{arch: vit_tiny_patch16_224, input_size: 32}", r"input_size 32: vit_tiny_patch16_224 cannot take 32 px images"),
])
def test_an_input_size_a_model_cannot_take_is_refused_before_the_teacher_trains(student, message):
    """It was a traceback at the distill stage, after the teacher and every round had trained."""
    from pipeline.stages.preflight import check_models
    from teachers.models import ModelError
    with pytest.raises(ModelError, match=message):
        check_models(load_config(None, [f"distill.students=[{student}]"]))


def test_a_round_one_student_that_cannot_grow_from_its_teacher_is_refused_before_the_teacher_trains():
    from pipeline.stages.preflight import check_models
    from teachers.models import ModelError
    config = load_config(None, ["student.rounds=1", "teacher.model.arch=test_resnet", "student.model.init=teacher",
                                "student.model.arch=mobilenetv3_small_100", "distill.students=[]"])
    with pytest.raises(ModelError, match=r"student.model.init \"teacher\" \(mobilenetv3_small_100\): cannot grow "
                                         r"'test_resnet' .*Give student.model.arch=test_resnet"):
        check_models(config)
    check_models(load_config(None, ["student.rounds=1", "teacher.model.arch=test_resnet", "distill.students=[]",
                                    "student.model.init=teacher", "student.model.arch=test_resnet"]))


def test_pretraining_on_an_import_used_in_place_fingerprints_its_shards(tiny_data, tmp_path):
    """`pretrain.data: {source: shards, path: P}`: an import made again at P (other labeled images) resumed a
    half-done pretraining on them, or skipped a finished one, as the path alone had not changed."""
    import shutil

    from pipeline.core.rundir import RunDir
    from pipeline.stages.base import StageContext
    from pipeline.stages.pretrain import inputs

    source = tmp_path / "source"
    shutil.copytree(tiny_data, source)
    config = load_config(None, [f"pretrain.data={{source: shards, path: {source}}}", "teacher.model.init=pretrain"])
    g = build_graph(config)
    ctx = StageContext(config, RunDir(tmp_path / "run"), None, g)  # type: ignore[arg-type]
    before = inputs(ctx, g.get("pretrain"))
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["splits"]["labeled"]["shards"][0]["sha256"] = "0" * 64  # re-imported: other bytes, same path
    (source / "manifest.json").write_text(json.dumps(manifest))
    after = inputs(ctx, g.get("pretrain"))
    assert before["data"] == after["data"] and before["data_manifest"] != after["data_manifest"]


def test_the_mutual_peers_init_weights_are_an_input_of_the_distillation(tiny_teacher_run, tiny_data, tmp_path):
    """Weights replaced under the peer's `init` path: the stage was skipped as done (a student's init is hashed)."""
    import shutil

    from pipeline.stages.base import StageContext
    from pipeline.stages.distill import inputs
    from pipeline.stages.runner import make_run_dir

    _, run = tiny_teacher_run
    peer_start = tmp_path / "peer"
    shutil.copytree(run / "teacher" / "checkpoint", peer_start)
    config = load_config(None, ["data.source=shards", f"data.path={tiny_data}", "student.rounds=0",
                                "distill.students=[{arch: test_resnet, input_size: 16}]", "distill.mutual.weight=1",
                                f"distill.mutual.peer={{arch: test_resnet, input_size: 16, init: {peer_start}}}"])
    g = build_graph(config)
    ctx = StageContext(config, make_run_dir(config, run), None, g)  # type: ignore[arg-type]
    before = inputs(ctx, g.get("distill_test_resnet"))["peer_init_sha256"]
    weights = next(p for p in peer_start.iterdir() if p.name != "meta.json")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\1" * 8)
    meta = json.loads((peer_start / "meta.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (peer_start / "meta.json").write_text(json.dumps(meta))
    assert inputs(ctx, g.get("distill_test_resnet"))["peer_init_sha256"] != before


def test_a_missing_pretraining_source_is_named_before_the_first_stage(tmp_path):
    from pipeline.core.rundir import RunDir
    from pipeline.data.sources.fashion_mnist import DataSourceError
    from pipeline.stages.preflight import check_pretrain_source

    for source, message in (("fashion-mnist", "pretrain.data.path: "), ("shards", "pretrain.data.path: "),
                            ("folder", "pretrain.data.path: image folder")):
        config = load_config(None, [f"pretrain.data={{source: {source}, path: {tmp_path / 'none'}}}",
                                    "teacher.model.init=pretrain"])
        with pytest.raises(DataSourceError, match=message):
            check_pretrain_source(config, build_graph(config), RunDir(tmp_path / "run"))


def test_the_disk_check_counts_the_images_a_capped_import_writes(tmp_path, monkeypatch):
    """A 300-image import on a 20 MB disk was refused for the 143 MB of a whole Fashion-MNIST import."""
    from collections import namedtuple

    from pipeline.core.rundir import RunDir, RunDirError
    from pipeline.stages.preflight import check_data

    monkeypatch.setattr("pipeline.stages.preflight.check_source", lambda data, key="data": None)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("pipeline.stages.preflight.shutil.disk_usage", lambda path: usage(0, 0, 30_000_000))
    capped = load_config(None, ["data.max_unlabeled=300", "data.labels_per_class=10"])
    check_data(capped, RunDir(tmp_path / "run"), reimport=False)  # 10,400 images: about 21 MB
    with pytest.raises(RunDirError, match="30 MB free, the import needs about 143 MB"):
        check_data(load_config(None, []), RunDir(tmp_path / "run"), reimport=False)


def test_pseudo_labels_record_the_precision_they_are_made_in(tiny_teacher_run, tiny_data, monkeypatch):
    """On a GPU labeling runs under autocast: a stage resumed in another precision mixed bf16 and fp32 sidecars."""
    import torch

    from pipeline.stages.base import StageContext
    from pipeline.stages.runner import make_run_dir, stage_inputs

    _, run = tiny_teacher_run
    config = load_config(None, ["data.source=shards", f"data.path={tiny_data}", "student.rounds=0",
                                "runtime.mixed_precision=bf16", "teacher.model.arch=test_resnet"])
    g = build_graph(config)
    ctx = StageContext(config, make_run_dir(config, run), None, g)  # type: ignore[arg-type]
    assert stage_inputs(ctx, g.get("pseudo_label_r1"))["mixed_precision"] == "no"  # no autocast on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_inputs(ctx, g.get("pseudo_label_r1"))["mixed_precision"] == "bf16"
