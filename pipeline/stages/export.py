"""Stage `export`: ONNX fp32 + int8 of every distilled (and pruned) student and of the teacher,
checked against PyTorch, measured side by side.

Reads: the checkpoints of the distill teacher and of every distill/prune stage, the test split,
a few hundred labeled training images for int8 calibration.
Writes: `<stage>.onnx` and `<stage>.int8.onnx` (each carrying its preprocessing in its
metadata, so `selftrain predict` needs nothing beside it), `metrics.json` with the deployment
table (one row per model x runtime/precision: test top-1, ECE, agreement with the teacher,
parameters, MACs, file size, batch-1 latency and batch-64 throughput, median of repeated runs,
same threads; a model's fp32 and int8 ONNX sessions are timed in interleaved rounds), the best
model under `distill.export.latency_budget_ms`, `pareto.png`, `deployment.md`, DONE.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from augment import build_eval_transform
from pipeline.core.atomic import read_json, write_bytes, write_text
from pipeline.core.metrics import classification_metrics
from pipeline.data.imageset import ImageSet, load_labeled_split
from pipeline.engine.predict import load_model
from pipeline.engine.runtime import configure_threads
from pipeline.engine.serving import ONNX_META_KEY
from pipeline.stages.base import Stage, StageContext
from students.deploy_metrics import (best_under_budget, count_macs_and_params, int8_speed_vs_fp32, pareto_front,
                                     pareto_plot)
from students.export import compare_with_torch, export_onnx, file_size_bytes, onnx_logits, onnx_session, torch_logits
from students.latency import interleaved_onnx_latency, onnx_latency, torch_latency
from students.quantize import quantize_checked, setup_for_this_cpu
from teachers.checkpoint import META, checkpoint_hash


EXTERNAL_TEACHER = "distill_teacher"  # `distill.teacher`'s row and file: not "teacher", the run's own stage


def exported_models(ctx: StageContext, this: Stage) -> list[tuple[str, Path]]:
    """(stage name, checkpoint dir): the teacher first, then every model stage this stage needs."""
    teacher = ctx.teacher_dir(this)
    return [(this.teacher or EXTERNAL_TEACHER, teacher)] + [(n, ctx.run.checkpoint_dir(n)) for n in this.needs
                                                            if ctx.graph.get(n).kind in ("distill", "prune")]


def spread_subset(images: ImageSet, count: int, skip: int = 0) -> ImageSet:
    """Images `skip` to `skip + count` of a fixed shuffle of the split: a split stored class by class (an image
    folder's, many foreign shards) gives every class its share, where its first rows held a few classes only."""
    rows = np.sort(np.random.default_rng(0).permutation(len(images))[skip:skip + count])
    return ImageSet([images.images[i] for i in rows], images.labels[rows], [images.keys[i] for i in rows]
                    if images.keys else [])


def inputs(ctx: StageContext, stage: Stage) -> dict:
    return {"models": {name: checkpoint_hash(path) for name, path in exported_models(ctx, stage)},
            "export": dataclasses.asdict(ctx.config.distill.export)}


def model_input(images: ImageSet, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 NCHW through the model's own eval transform and normalisation (one batch op)."""
    transform = build_eval_transform(size)
    views = np.stack([transform(image) for image in images.images]).astype(np.float32) / 255.0
    views = (views - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(views.transpose(0, 3, 1, 2))


def embed_meta(path: Path, checkpoint: Path) -> None:
    """Put the checkpoint's meta.json into the ONNX file's metadata (preprocessing travels with it)."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, json.dumps(read_json(checkpoint / META))
    write_bytes(path, model.SerializeToString())  # a full disk: `cannot write PATH: ENOSPC`, no partial file


def score(logits: np.ndarray, labels: np.ndarray, classes: list[str], teacher_pred: np.ndarray) -> dict:
    found = classification_metrics(logits, labels, classes)
    return {"top1": found["top1"], "ece": found["ece"],
            "teacher_agreement": float((logits.argmax(1) == teacher_pred).mean())}


def run(ctx: StageContext, this: Stage) -> dict:
    config, run_dir, data = ctx.config, ctx.run, ctx.data()
    cfg = config.distill.export
    configure_threads(config.runtime)
    out = run_dir.stage_dir(this.name)
    out.mkdir(parents=True, exist_ok=True)
    test = load_labeled_split(data, "test")
    if cfg.eval_images is not None:
        test = spread_subset(test, cfg.eval_images)
    labeled = load_labeled_split(data, "labeled")
    calibration_set = spread_subset(labeled, cfg.calibration_images)
    # the int8 check reads the labeled images calibration did not see (all of them when it saw all)
    check_set = spread_subset(labeled, len(labeled), skip=cfg.calibration_images) \
        if len(labeled) > cfg.calibration_images else calibration_set
    if check_set is calibration_set:
        print(f"[{this.name}] the int8 agreement check reads the {len(labeled)} calibration images themselves (no "
              f"other labeled images: distill.export.calibration_images is {cfg.calibration_images})")
    threads = torch.get_num_threads()
    rows: list[dict] = []
    teacher_pred = None
    for name, checkpoint in exported_models(ctx, this):
        model, meta = load_model(checkpoint, data.num_classes)
        model.eval()
        shape = (meta.in_chans, meta.input_size, meta.input_size)
        x_test = model_input(test, meta.input_size, meta.mean, meta.std)
        reference = torch_logits(model, x_test)
        teacher_pred = reference.argmax(1) if teacher_pred is None else teacher_pred
        macs, params = count_macs_and_params(model, shape)
        common = {"model": name, "arch": meta.arch, "input_size": meta.input_size, "params": params, "macs": macs}
        torch_speed = torch_latency(model, shape, batch=64, repeats=cfg.repeats, channels_last=True)
        rows.append({**common, "runtime": "pytorch", "precision": "fp32", **score(reference, test.labels, data.classes,
                     teacher_pred), "file_bytes": file_size_bytes(checkpoint / "model.safetensors"),
                     **_speed(torch_speed)})
        fp32_path = out / f"{name}.onnx"
        exporter = export_onnx(model, fp32_path, shape)
        embed_meta(fp32_path, checkpoint)
        session = onnx_session(fp32_path, threads)
        check = compare_with_torch(model, session, x_test[:256])
        fp32_row = {**common, "runtime": "onnxruntime", "precision": "fp32", "path": str(fp32_path),
                    **score(onnx_logits(session, x_test), test.labels, data.classes, teacher_pred),
                    "file_bytes": file_size_bytes(fp32_path), "exporter": exporter["exporter"],
                    "max_abs_logit_diff_vs_torch": check["max_abs_logit_diff"],
                    "top1_agreement_vs_torch": check["top1_agreement"]}
        if not cfg.int8:
            rows.append({**fp32_row, **_speed(onnx_latency(session, shape, batch=64, repeats=cfg.repeats))})
        else:
            int8_path = out / f"{name}.int8.onnx"
            settings = quantize_checked(fp32_path, int8_path,
                                        model_input(calibration_set, meta.input_size, meta.mean, meta.std),
                                        model_input(check_set, meta.input_size, meta.mean, meta.std),
                                        setup_for_this_cpu(), cfg.int8_min_agreement)
            int8_session = onnx_session(int8_path, threads)
            speed = paired_speed(session, int8_session, shape, cfg.repeats)
            rows.append({**fp32_row, **speed["fp32"]})
            int8_scores = score(onnx_logits(int8_session, x_test), test.labels, data.classes, teacher_pred)
            del int8_session  # int8_row may delete the file
            rows.append(int8_row(common, int8_path, checkpoint, settings, {**int8_scores, **speed["int8"]}))
        print(f"[{this.name}] {name}: " + "; ".join(
            f"{r['runtime']} {r['precision']} top-1 {r['top1']:.4f} {r['batch1_ms']:.2f} ms"
            for r in rows if r["model"] == name))
    for row in rows:
        row["label"] = f"{row['model']} {row['runtime']} {row['precision']}"
    onnx_rows = [r for r in rows if r["runtime"] == "onnxruntime" and "rejected" not in r]
    best = best_under_budget(onnx_rows, "batch1_ms", cfg.latency_budget_ms, "top1")
    front = pareto_front(onnx_rows, "batch1_ms", "top1")
    pareto_plot(onnx_rows, out / "pareto.png", "batch1_ms", "top1", "label")
    int8_speed = int8_speed_vs_fp32(rows)
    metrics = {"rows": rows, "threads": threads, "num_test": len(test), "int8_vs_fp32": int8_speed,
               "latency_budget_ms": cfg.latency_budget_ms,
               "best_under_budget": {k: best[k] for k in ("model", "precision", "top1", "batch1_ms")} if best else None,
               "pareto": [{k: r[k] for k in ("model", "precision", "top1", "batch1_ms")} for r in front]}
    table = deployment_table(rows) + int8_speed_notes(int8_speed, threads) + disturbed_timing_notes(rows)
    if len(test) < ctx.data().count("test"):  # distill.export.eval_images
        table = (f"Test top-1, ECE and agreement on {len(test):,} of the {ctx.data().count('test'):,} test images "
                 "(`distill.export.eval_images`): the stages' own test top-1 is on all of them.\n\n" + table)
    write_text(out / "deployment.md", table + "\n")
    run_dir.write_metrics(this.name, metrics)
    run_dir.mark_done(this.name)
    print(table)
    return metrics


def paired_speed(fp32: ort.InferenceSession, int8: ort.InferenceSession, shape: tuple[int, int, int],
                 repeats: int, rounds: int = 3) -> dict[str, dict]:
    """Batch-1 latency and batch-64 throughput of a model's fp32 and int8 sessions, timed in interleaved
    rounds (`repeats` calls in all per batch size, split over the rounds), so that a neighbour's load
    or a drifting CPU hits both alike and their ratio can be trusted more than either time."""
    per_round = max(1, -(-repeats // rounds))
    found = interleaved_onnx_latency({"fp32": fp32, "int8": int8}, shape, batch=64, repeats=per_round, rounds=rounds)
    return {name: _speed(latency) for name, latency in found.items()}


def int8_row(common: dict, int8_path: Path, checkpoint: Path, settings: dict, scores_and_speed: dict) -> dict:
    """The int8 row; a rejected model (see quantize_checked) is scored, named, and its file deleted."""
    row = {**common, "runtime": "onnxruntime", "precision": "int8", **scores_and_speed, "quantization": settings}
    if "rejected" in settings:
        row["file_bytes"] = file_size_bytes(int8_path)
        int8_path.unlink()
        row["rejected"] = settings["rejected"]
        print(f"[export] {common['model']}: int8 model rejected and deleted: {settings['rejected']}")
        return row
    embed_meta(int8_path, checkpoint)
    return {**row, "file_bytes": file_size_bytes(int8_path), "path": str(int8_path)}  # the file as shipped


def _speed(latency: dict) -> dict:
    return {"batch1_ms": latency["batch1_ms"], "batch64_img_s": latency["batch64_img_s"]}


def int8_speed_notes(ratios: list[dict], threads: int) -> str:
    """Lines under the table: int8 over fp32 in onnxruntime per model, the slower cases named with the
    command that re-measures them, on one thread too (spells of host slowness can halve a multi-threaded
    int8 model's throughput for a while: README "Deployment table")."""
    thread_counts = "1" if threads <= 1 else f"1 {threads}"
    lines = []
    for r in ratios:
        line = (f"- {r['model']}: int8 / fp32 speed in onnxruntime on this CPU: batch 1 {r['batch1_speedup']:.2f}x, "
                f"batch 64 {r['batch64_speedup']:.2f}x")
        if r["slower_at"]:
            sizes = " and ".join(str(b) for b in r["slower_at"])
            line += (f"; **int8 measured slower at batch {sizes}**: re-measure with more rounds, "
                     f"`python bench/bench_int8_speed.py RUN/export --rounds 5 --threads {thread_counts}`, "
                     "before serving int8 there")
        lines.append(line)
    return "\n\n" + "\n".join(lines) if lines else ""


def disturbed_timing_notes(rows: list[dict]) -> str:
    """Rows where one image took longer than a whole batch of 64: no model does that, a neighbour's load
    during the timing did (the PyTorch rows are timed once, not in interleaved rounds as fp32/int8 are)."""
    lines = [f"- {r['model']} {r['runtime']} {r['precision']}: **timing disturbed** (batch 1 took "
             f"{r['batch1_ms']:.2f} ms, a batch of 64 {64000 / r['batch64_img_s']:.2f} ms): re-measure with "
             "`python bench/bench_int8_speed.py RUN/export` on a quiet CPU"
             for r in rows if r["batch1_ms"] > 64000 / r["batch64_img_s"]]
    return "\n\n" + "\n".join(lines) if lines else ""


def deployment_table(rows: list[dict]) -> str:
    """One line per row; the first model is the distillation teacher, whose predictions 'agrees' compares with."""
    teacher = rows[0]["model"] if rows else None
    lines = ["| model | arch | px | runtime | precision | test top-1 % | ECE | agrees with the distillation teacher % "
             "| params (M) | MMACs | file MB | batch-1 ms | batch-64 img/s |", "|" + "---|" * 13]
    for r in rows:
        precision = f"{r['precision']} (rejected)" if "rejected" in r else r["precision"]
        model = f"{r['model']} (teacher)" if r["model"] == teacher else r["model"]
        lines.append(f"| {model} | {r['arch']} | {r['input_size']} | {r['runtime']} | {precision} "
                     f"| {100 * r['top1']:.2f} | {r['ece']:.4f} | {100 * r['teacher_agreement']:.2f} "
                     f"| {r['params'] / 1e6:.2f} | {r['macs'] / 1e6:.1f} | {r['file_bytes'] / 1e6:.2f} "
                     f"| {r['batch1_ms']:.2f} | {r['batch64_img_s']:.0f} |")
    return "\n".join(lines)
