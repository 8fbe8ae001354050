"""Stage `report`: one table of every stage's metrics, as Markdown, CSV and PNG.

Reads every metrics.json of the run; writes report/report.md, report/summary.csv,
report/accuracy_by_round.png and report/loss_terms.png, and prints the table.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib.pyplot as plt

from pipeline.core.atomic import read_json, write_text
from pipeline.core.plots import save_figure
from pipeline.core.rundir import RunDir
from pipeline.stages.base import Stage, StageContext

COLUMNS = ("stage", "arch", "policy", "top1", "holdout_top1", "ece", "teacher_agreement", "pool_accuracy", "kept",
           "wall_seconds")


def _num(value: object, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else ""


def _pct(value: object) -> str:
    return _num(100 * value, "{:.2f}") if isinstance(value, (int, float)) else ""


def stage_wall_seconds(run: RunDir, stage: str, metrics: dict) -> float | None:
    """Seconds over all invocations (wall_time.json); runs made before it existed: the metrics' own figure."""
    wall = run.wall_seconds(stage)
    return wall if wall is not None else metrics.get("wall_seconds")


def collect_rows(run: RunDir, stages: list[Stage]) -> list[dict]:
    rows = []
    for item in stages:
        if item.kind == "report":
            continue
        stage = item.name
        path = run.metrics_path(stage)
        m = read_json(path) if path.exists() else {}
        wall = stage_wall_seconds(run, stage, m)
        if not path.exists() and wall is None:
            continue
        row = {"stage": stage, "arch": m.get("arch", ""), "policy": m.get("policy", ""), "top1": m.get("top1"),
               "holdout_top1": (m.get("holdout") or {}).get("top1"), "ece": m.get("ece"),
               **({"policy": f"{m.get('policy', '')} (k-NN top-1)", "top1": m["knn_top1"]} if "knn_top1" in m else {}),
               "teacher_agreement": m.get("teacher_agreement"), "pool_accuracy": m.get("pool_accuracy"),
               "wall_seconds": wall, "kept": ""}
        if item.kind == "select" and m:
            sel = m["selection"]
            row["kept"] = f"{sel['unique_kept']} ({sel['copies']} with copies)"
            row["pool_accuracy"] = (m.get("selected_accuracy") or {}).get("weighted_by_copies")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| stage | arch | policy | test top-1 % | holdout top-1 % | ECE | agreement with teacher % "
            "| pseudo-label acc % | kept | wall s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        cells = [r["stage"], r["arch"], r["policy"], _pct(r["top1"]), _pct(r["holdout_top1"]),
                 _num(r["ece"], "{:.4f}"),
                 _pct(r["teacher_agreement"]), _pct(r["pool_accuracy"]), str(r["kept"]),
                 _num(r["wall_seconds"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_by_round_chart(run: RunDir, stages: list[Stage], path: Path) -> bool:
    """Whether there was anything to plot (and the PNG was written)."""
    names = [s.name for s in stages if s.trains_model and s.kind not in ("pretrain", "ssl_pretrain")
             and run.metrics_path(s.name).exists()]  # pretraining is measured on another task (or not at all)
    if not names:
        return False
    top1 = [100 * read_json(run.metrics_path(s))["top1"] for s in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(names)), 3.2))
    ax.plot(range(len(names)), top1, marker="o")
    for x, y in enumerate(top1):
        ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")  # long distill_/prune_ names side by side
    ax.margins(x=0.08, y=0.18)  # room for the values written above the points
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("test top-1 by stage")
    save_figure(fig, path)
    return True


def loss_terms_chart(run: RunDir, stages: list[Stage], path: Path) -> bool:
    """Whether there was anything to plot (and the PNG was written)."""
    students = [s.name for s in stages if s.kind == "student" and run.metrics_path(s.name).exists()]
    if not students:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for stage in students:
        history = read_json(run.metrics_path(stage)).get("loss_history", [])
        steps = [h["step"] for h in history]
        for term, style in (("loss_labeled", "-"), ("loss_pseudo", "--")):
            if history and term in history[0]:
                ax.plot(steps, [h[term] for h in history], style, marker="o" if len(history) == 1 else None,
                        label=f"{stage} {term}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.set_title("student loss terms")
    save_figure(fig, path)
    return True


def deployment_section(run: RunDir, stages: list[Stage]) -> str:
    """The export stage's deployment table and Pareto plot, when the run has one."""
    for stage in stages:
        table = run.stage_dir(stage.name) / "deployment.md"
        if stage.kind == "export" and table.exists() and run.metrics_path(stage.name).exists():
            metrics = read_json(run.metrics_path(stage.name))
            best, budget = metrics.get("best_under_budget"), metrics["latency_budget_ms"]
            verdict = (f"Best under the {budget} ms batch-1 budget (onnxruntime): **{best['model']} "
                       f"{best['precision']}** ({100 * best['top1']:.2f} %, {best['batch1_ms']:.2f} ms).\n\n" if best
                       else f"No model meets the {budget} ms batch-1 budget (onnxruntime; "
                            "`distill.export.latency_budget_ms`).\n\n")
            return (f"\n## Deployment\n\n{table.read_text()}\n{verdict}"
                    f"![accuracy against batch-1 latency](../{stage.name}/pareto.png)\n")
    return ""


def labeled_text(manifest: dict) -> str:
    """What the import gave to train on, from its manifest: the config's labels_per_class is not the count
    when the data is an import made elsewhere (`data.source: shards`, webdataset shards)."""
    per_class = manifest["splits"]["labeled"].get("per_class") or []
    holdout = manifest["splits"].get("holdout", {}).get("count", 0)
    held = f", {holdout} more held out" if holdout else ""
    if per_class and min(per_class) == max(per_class):
        return f"{per_class[0]} labeled images per class{held}"
    total = manifest["splits"]["labeled"]["count"]
    spread = f" ({min(per_class)}-{max(per_class)} per class)" if per_class else ""
    return f"{total} labeled images{spread}{held}"


def run(ctx: StageContext, this: Stage) -> str:
    config, run_dir, stages = ctx.config, ctx.run, list(ctx.graph.stages)
    out = run_dir.stage_dir(this.name)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect_rows(run_dir, stages)
    table = markdown_table(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "summary.csv", buffer.getvalue())
    plots = [f"![{title}]({name})\n\n" for name, title, chart in (
        ("accuracy_by_round.png", "accuracy by round", accuracy_by_round_chart),
        ("loss_terms.png", "loss terms", loss_terms_chart)) if chart(run_dir, stages, out / name)]
    text = (f"# Run report: {run_dir.root}\n\nSeed {config.seed}; {labeled_text(ctx.data().manifest)}.\n\n"
            f"{table}\n\nPseudo-label accuracy uses the pool's hidden labels (reporting only).\n\n"
            + "".join(plots) + deployment_section(run_dir, stages))
    write_text(out / "report.md", text)
    run_dir.mark_done(this.name)
    print(table)
    print(f"report: {out / 'report.md'}")
    return text
