"""The declared stage graph: names, kinds, needs, teachers, --only/--from selection."""

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
