"""The declared stage graph of a run: the one place that creates and names stages.

    data -> teacher -> pseudo_label_r1 -> select_r1 -> student_r1 -> pseudo_label_r2 -> ... -> report

Round i's teacher is `teacher` (i = 1) or `student_r{i-1}`. With `student.rounds: 0`
the run stops after the first selection. Adding a stage means adding an entry here
and one module under `pipeline/stages/` with `run(ctx, stage)` (and `inputs(ctx, stage)`
when its result depends on inputs that a rerun must match).
"""

from __future__ import annotations

from pipeline.config.sections import Config
from pipeline.stages import data_import, pseudo_label, report, select, student, teacher
from pipeline.stages.base import Stage, StageGraph


def build_graph(config: Config) -> StageGraph:
    stages = [Stage("data", "data", data_import.run, data_import.inputs, main_process_only=True),
              Stage("teacher", "teacher", teacher.run, teacher.inputs, needs=("data",))]
    round_teacher = "teacher"
    for i in range(1, max(config.student.rounds, 1) + 1):
        labels, selection, trained = f"pseudo_label_r{i}", f"select_r{i}", f"student_r{i}"
        stages += [
            Stage(labels, "pseudo_label", pseudo_label.run, pseudo_label.inputs, needs=("data", round_teacher),
                  round=i, teacher=round_teacher),
            Stage(selection, "select", select.run, select.inputs, needs=(labels,), round=i, teacher=round_teacher,
                  labels=labels),
        ]
        if i <= config.student.rounds:
            stages.append(Stage(trained, "student", student.run, student.inputs,
                                needs=(round_teacher, labels, selection), round=i, teacher=round_teacher,
                                labels=labels, selection=selection))
        round_teacher = trained
    stages.append(Stage("report", "report", report.run, needs=tuple(s.name for s in stages),
                        main_process_only=True))
    return StageGraph(tuple(stages))
