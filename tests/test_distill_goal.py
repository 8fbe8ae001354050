"""bench/distill_goal.py, the command that reproduces one seed of the distillation goal rows."""

from __future__ import annotations

import json
import shutil

from conftest import TINY_TEACHER, set_args
from test_bench_scripts import bench
from test_student import STUDENT

TINY_DISTILL = ["distill.labeled_batch=8", "distill.train.batch_size=24", "distill.train.save_every_steps=4",
                "distill.train.lr=0.01"]


def test_distilled_and_labels_only_students_get_the_same_steps_and_settings(tiny_teacher_run, tmp_path):
    config, teacher_run = tiny_teacher_run
    out = tmp_path / "goal"
    shutil.copytree(teacher_run, out / "seed0", ignore=shutil.ignore_patterns("lock"))  # data + teacher done
    goal = ["distill_goal.py", "--seed", "0", "--rounds", "1", "--passes", "2", "--student", "test_efficientnet@24",
            "--out", str(out), "--config", str(config), *set_args(TINY_TEACHER + STUDENT + TINY_DISTILL)]
    # the labels-only side first, on its own (another session, or beside the distillation): planned steps
    first = bench(*goal, "--part", "labels-only", timeout=600)
    assert not (out / "seed0" / "student_r1").exists()  # nothing of the distillation side ran
    made = (out / "seed0-labels-only" / "teacher" / "metrics.json").read_text()
    assert first == [{"run": str(out / "seed0-labels-only" / "teacher"), "part": "labels-only",
                      "steps": json.loads(made)["steps"], "top1": round(100 * json.loads(made)["top1"], 2)}]
    # then the distillation side on its own: the chain up to the distilled student, nothing of the other side
    second = bench(*goal, "--part", "distilled", timeout=600)
    distilled = json.loads((out / "seed0" / "distill_test_efficientnet" / "metrics.json").read_text())
    assert second == [{"run": str(out / "seed0" / "distill_test_efficientnet"), "part": "distilled",
                       "steps": distilled["steps"], "top1": round(100 * distilled["top1"], 2)}]
    assert (out / "seed0-labels-only" / "teacher" / "metrics.json").read_text() == made
    rows = bench(*goal, timeout=600)  # the row, from both sides as they are
    assert (out / "seed0-labels-only" / "teacher" / "metrics.json").read_text() == made  # reused, not retrained
    assert json.loads((out / "seed0" / "distill_test_efficientnet" / "metrics.json").read_text()) == distilled
    assert len(rows) == 1
    row = rows[0]
    assert row == json.loads((out / "seed0-goal.json").read_text())
    distill = json.loads((out / "seed0" / "distill_test_efficientnet" / "metrics.json").read_text())
    alone = json.loads((out / "seed0-labels-only" / "teacher" / "metrics.json").read_text())
    # the same budget and the same model, trained on the same import's labels with the distillation's settings
    assert row["steps"] == distill["steps"] == alone["steps"] == 2 * distill["steps_per_epoch"]
    assert alone["arch"] == "test_efficientnet" and alone["num_labeled"] == distill["num_labeled"]
    taught = json.loads((out / "seed0" / "distill_test_efficientnet" / "stage.json").read_text())["inputs"]["train"]
    stage = json.loads((out / "seed0-labels-only" / "teacher" / "stage.json").read_text())["inputs"]
    assert stage["model"]["input_size"] == 24
    same = ("optimizer", "lr", "weight_decay", "policy", "label_smoothing")
    assert {k: stage["train"][k] for k in same} == {k: taught[k] for k in same}
    assert taught["optimizer"] == "adamw" and taught["lr"] == 0.01
    assert stage["train"]["batch_size"] == 24 + 8  # the distillation's unlabeled + labeled images a step
    assert set(row["rounds_top1"]) == {"teacher", "student_r1"}
    assert row["distilled_minus_labels_only"] == round(row["distilled_top1"] - row["labels_only_top1"], 2)
    assert row["distilled_minus_teacher"] == round(100 * (distill["top1"] - distill["teacher_top1"]), 2)
