"""The declared stage graph of a run: the one place that creates and names stages.

    data [-> pretrain_data -> pretrain] [-> ssl_pretrain] -> teacher -> pseudo_label_r1 -> select_r1 -> student_r1 -> pseudo_label_r2 -> ...
         -> [pseudo_label_distill] -> distill_<arch> [-> prune_<arch>] ... -> export -> report

Round i's teacher is `teacher` (i = 1) or `student_r{i-1}`. With `student.rounds: 0`
no student trains: the teacher still labels and selects once (measured), and is the one the
`distill.students` learn from. Each `distill.students` entry adds one
`distill_<arch>` stage whose teacher is the last round (or `distill.teacher`); offline
distillation adds a pseudo-label stage for that teacher when no round labels with it.
`distill.prune.enabled` adds `prune_<arch>` after each; `export` takes every distilled and
pruned student and the teacher to ONNX fp32 + int8 and measures them. Adding a stage means adding an entry here
and one module under `pipeline/stages/` with `run(ctx, stage)` (and `inputs(ctx, stage)`
when its result depends on inputs that a rerun must match).
"""

from __future__ import annotations

from pipeline.config.sections import Config, ModelConfig
from pipeline.stages import (data_import, distill, export, pretrain, prune, pseudo_label, report, select,
                             ssl_pretrain, student, teacher)
from pipeline.stages.base import Stage, StageGraph


def distill_stage_name(student: ModelConfig, students: tuple[ModelConfig, ...]) -> str:
    """`distill_<arch>`, with the input size when one architecture appears twice."""
    twice = sum(s.arch == student.arch for s in students) > 1
    return f"distill_{student.arch}" + (f"_{student.input_size}" if twice else "")


def distill_stages(config: Config, stages: list[Stage], final: str) -> list[Stage]:
    """One stage per distill student (plus a labeling stage for offline teaching when needed)."""
    cfg = config.distill
    if not cfg.students:
        return []
    teacher_of = {"teacher": None, "teacher_path": cfg.teacher} if cfg.teacher else {"teacher": final}
    added: list[Stage] = []
    labels = None
    if cfg.mode == "offline":
        labels = next((s.name for s in stages if s.kind == "pseudo_label" and s.teacher == final
                       and not cfg.teacher), None)
        if labels is None:
            labels = "pseudo_label_distill"
            added.append(Stage(labels, "pseudo_label", pseudo_label.run, pseudo_label.inputs,
                               needs=("data",) + ((final,) if not cfg.teacher else ()), **teacher_of))
    peer = cfg.mutual.peer if cfg.mutual.weight > 0 else None
    for spec in cfg.students:
        needs = (("data",) + ((final,) if not cfg.teacher else ()) + ((labels,) if labels else ())
                 + tuple(dict.fromkeys(init_needs(spec, stages) + (init_needs(peer, stages) if peer else ()))))
        name = distill_stage_name(spec, cfg.students)
        added.append(Stage(name, "distill", distill.run, distill.inputs, needs=needs, labels=labels, spec=spec,
                           **teacher_of))
        if cfg.prune.enabled:
            added.append(Stage(name.replace("distill_", "prune_", 1), "prune", prune.run, prune.inputs,
                               needs=needs + (name,), labels=labels, spec=spec, source=name, **teacher_of))
    models = tuple(s.name for s in added if s.kind in ("distill", "prune"))
    added.append(Stage("export", "export", export.run, export.inputs, needs=models + ((final,) if not cfg.teacher
                                                                                      else ()),
                       main_process_only=True, **teacher_of))
    return added


def pretraining_stages(config: Config) -> list[Stage]:
    """`pretrain_data` + `pretrain` (supervised, another labeled data set), `ssl_pretrain` (SimCLR on the pool)."""
    stages = []
    if config.pretrain.data is not None:
        stages += [Stage(pretrain.DATA_STAGE, "data", pretrain.import_run, pretrain.import_inputs,
                         main_process_only=True),
                   Stage("pretrain", "pretrain", pretrain.run, pretrain.inputs, needs=(pretrain.DATA_STAGE,))]
    if config.ssl_pretrain.enabled:
        stages.append(Stage("ssl_pretrain", "ssl_pretrain", ssl_pretrain.run, ssl_pretrain.inputs, needs=("data",)))
    return stages


def init_needs(model: ModelConfig, stages: list[Stage]) -> tuple[str, ...]:
    """A stage whose `model.init` names a pretraining stage of the graph needs that stage (one the config
    leaves out is refused by preflight with the section to add)."""
    declared = {s.name for s in stages if s.kind in ("pretrain", "ssl_pretrain")}
    return (model.init,) if model.init in declared else ()


def build_graph(config: Config) -> StageGraph:
    stages = [Stage("data", "data", data_import.run, data_import.inputs, main_process_only=True),
              *pretraining_stages(config)]
    stages.append(Stage("teacher", "teacher", teacher.run, teacher.inputs,
                        needs=("data",) + init_needs(config.teacher.model, stages)))
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
                                needs=(round_teacher, labels, selection) + init_needs(config.student.model, stages),
                                round=i, teacher=round_teacher, labels=labels, selection=selection))
        round_teacher = trained
    final = f"student_r{config.student.rounds}" if config.student.rounds else "teacher"
    stages += distill_stages(config, stages, final)
    stages.append(Stage("report", "report", report.run, needs=tuple(s.name for s in stages),
                        main_process_only=True))
    return StageGraph(tuple(stages))
