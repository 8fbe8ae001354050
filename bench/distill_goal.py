"""One seed of the distillation goal rows (issue 13): a student distilled from the last Noisy Student round
against the same student trained on the labels only, same input size, same optimizer, same number of steps.

Runs two run directories, each resumable (after an interruption, run the same command again):
  OUT/seedS              the pipeline up to `distill_<student>`: import, teacher, rounds 1..R, distillation
  OUT/seedS-labels-only  the teacher stage with the student's architecture and input size on the labeled
                         images of the same import (OUT/seedS/data), with the distillation's optimizer settings, batch
                         (`distill.train.batch_size + distill.labeled_batch` labeled images a step), warm-up
                         and exactly as many steps as the distillation took
Prints one JSON line (also written to OUT/seedS-goal.json): test top-1 of each round, of the distilled and
the labels-only student, and the two differences the goal rows read (README "A longer schedule, 3 seeds").

The labels-only step count is planned from the import (a pass is ceil(pool / distill batch) steps), so
`--part labels-only` (the import and the labels-only student) and `--part distilled` (the pipeline up to the
distillation) can run in separate sessions or side by side; `--part both` (the default) then reuses what is
done and still refuses to report when the two step counts differ.

Usage: python bench/distill_goal.py --seed S [--rounds 3] [--passes 16] [--student mobilenetv3_small_100@64]
       [--part both|distilled|labels-only] [--out runs/goal] [--config configs/fashion_mnist.yaml]
       [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline.config.loading import load_config
from pipeline.config.sections import Config
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.atomic import read_json, write_text
from pipeline.engine.runtime import process_state
from pipeline.stages.graph import build_graph
from pipeline.stages.runner import end_processes, make_run_dir, run_up_to

WARMUP_SHARE = 0.05  # of the distillation's passes (0.8 of 16, 0.4 of 8: the README's runs)


def chain_overrides(seed: int, rounds: int, passes: int, student: str) -> list[str]:
    arch, _, size = student.partition("@")
    return [f"seed={seed}", f"data.seed={seed}", f"select.seed={seed}", f"student.rounds={rounds}",
            f"distill.students=[{{arch: {arch}, input_size: {size or 64}}}]", f"distill.train.epochs={passes}",
            f"distill.train.warmup_epochs={passes * WARMUP_SHARE:g}"]


def planned_distill_steps(chain: Config, splits: dict) -> tuple[int, int]:
    """(steps, steps per pass) of the distillation, from the import's split counts: the distill stage makes
    a pass ceil(pool / batch) steps (`goal_row` checks the plan against the steps it took)."""
    train = chain.distill.train
    per_pass = math.ceil(splits["unlabeled"]["count"] / train.batch_size)
    return train.total_steps(per_pass), per_pass


def labels_only_overrides(chain: Config, chain_dir: Path) -> list[str]:
    """The teacher stage turned into the labels-only student with the distillation's budget and settings."""
    train, student = chain.distill.train, chain.distill.students[0]
    batch = train.batch_size + chain.distill.labeled_batch
    data = make_run_dir(chain, chain_dir).data_dir  # RUN/data, or the import data.source: shards names
    splits = read_json(data / "manifest.json")["splits"]
    steps, per_pass = planned_distill_steps(chain, splits)
    warmup_steps = train.warmup_epochs * per_pass
    return ["data.source=shards", f"data.path={data}", "student.rounds=0", "distill.students=[]",
            f"teacher.model.arch={student.arch}", f"teacher.model.input_size={student.input_size}",
            f"teacher.model.drop_rate={student.drop_rate}", f"teacher.model.drop_path_rate={student.drop_path_rate}",
            "teacher.model.init=null", f"teacher.train.policy={train.policy}",
            f"teacher.train.optimizer={train.optimizer}", f"teacher.train.lr={train.lr}",
            f"teacher.train.weight_decay={train.weight_decay}", f"teacher.train.momentum={train.momentum}",
            f"teacher.train.label_smoothing={train.label_smoothing}", f"teacher.train.batch_size={batch}",
            f"teacher.train.steps={steps}",
            f"teacher.train.warmup_epochs={warmup_steps / math.ceil(splits['labeled']['count'] / batch):g}"]


def percent(top1: float) -> float:
    return round(100 * top1, 2)


def goal_row(chain_dir: Path, labels_only_dir: Path, distill: dict, rounds: int) -> dict:
    """The JSON line: `distill` is the distill stage's metrics."""
    alone = read_json(labels_only_dir / "teacher" / "metrics.json")
    if alone["steps"] != distill["steps"]:
        raise SystemExit(f"{labels_only_dir}: the labels-only student took {alone['steps']} steps, the distilled "
                         f"one {distill['steps']}; the goal compares equal budgets")
    stages = ["teacher"] + [f"student_r{i}" for i in range(1, rounds + 1)]
    return {"run": str(chain_dir), "steps": distill["steps"], "student": distill["arch"],
            "input_size": distill["input_size"],
            "rounds_top1": {s: percent(read_json(chain_dir / s / "metrics.json")["top1"]) for s in stages},
            "distilled_top1": percent(distill["top1"]), "labels_only_top1": percent(alone["top1"]),
            "distilled_minus_teacher": round(100 * (distill["top1"] - distill["teacher_top1"]), 2),
            "distilled_minus_labels_only": round(100 * (distill["top1"] - alone["top1"]), 2),
            "agreement_with_teacher": percent(distill["teacher_agreement"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3, help="Noisy Student rounds before distilling (default 3)")
    parser.add_argument("--passes", type=int, default=16, help="distillation passes over the pool (default 16)")
    parser.add_argument("--student", default="mobilenetv3_small_100@64", metavar="ARCH@SIZE")
    parser.add_argument("--part", choices=("both", "distilled", "labels-only"), default="both",
                        help="run one side only (each prints its own top-1; 'both' reports the goal row)")
    parser.add_argument("--out", type=Path, default=Path("runs/goal"))
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for both runs (the labels-only run's budget still wins)")
    args = parser.parse_args()
    keep_freed_memory()  # as `selftrain` does
    chain_dir, labels_only_dir = args.out / f"seed{args.seed}", args.out / f"seed{args.seed}-labels-only"
    chain = load_config(args.config, chain_overrides(args.seed, args.rounds, args.passes, args.student)
                        + args.overrides)
    graph = build_graph(chain)
    distill_stage, data_stage = graph.of_kind("distill")[0].name, graph.of_kind("data")[0].name
    state = process_state()
    try:
        run_up_to(chain, chain_dir, data_stage if args.part == "labels-only" else distill_stage, state)
        if args.part != "distilled":
            alone = load_config(args.config, [f"seed={args.seed}"] + args.overrides
                                + labels_only_overrides(chain, chain_dir))
            run_up_to(alone, labels_only_dir, "teacher", state)
    finally:
        end_processes(state)
    if not state.is_main_process:
        return
    if args.part == "both":
        row = goal_row(chain_dir, labels_only_dir, read_json(chain_dir / distill_stage / "metrics.json"), args.rounds)
        write_text(args.out / f"seed{args.seed}-goal.json", json.dumps(row, indent=1) + "\n")
    else:
        done = chain_dir / distill_stage if args.part == "distilled" else labels_only_dir / "teacher"
        metrics = read_json(done / "metrics.json")
        row = {"run": str(done), "part": args.part, "steps": metrics["steps"], "top1": percent(metrics["top1"])}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
