"""Stage `prune_<arch>` (optional, `distill.prune.enabled`): structured L1 filter pruning of one
distilled student, fine-tuned with the same KD loss after every pruning step, down to
`distill.prune.target_macs` of its MACs (students/prune.py, torch-pruning's dependency graph).

Reads: the distilled student's checkpoint, its teacher, the data (as the distill stage).
Writes: a pruned checkpoint (same format plus structure.json: the layer widths), metrics.json with
MACs and parameters before/after per step, and measured PyTorch latency before/after, DONE.
A killed prune stage starts again from the distilled checkpoint (it holds no resumable state).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.config.schema import to_dict
from pipeline.core.progress import PROGRESS_FILE, ProgressWriter
from pipeline.engine.predict import load_model
from pipeline.engine.trainer import TrainResult, train
from pipeline.engine.training import finish, setup_training, swap_in_ema, training_fingerprint_inputs
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.distill import prepare_kd, student_stage_config, teacher_comparison, teacher_inputs
from students.latency import interleaved_torch_latency
from students.prune import PruneError, prune_to_macs, save_pruned
from teachers.checkpoint import checkpoint_hash


def _stage_config(ctx: StageContext, this: Stage):
    base = student_stage_config(ctx.config, this.spec)
    prune = ctx.config.distill.prune
    train_cfg = dataclasses.replace(base.train, lr=prune.lr, warmup_epochs=0.0,
                                    save_every_steps=prune.fine_tune_steps + 1)  # never saves: restarts whole
    model = dataclasses.replace(base.model, init=str(ctx.run.checkpoint_dir(this.source)))
    return dataclasses.replace(base, model=model, train=train_cfg)


def _recorded_init(ctx: StageContext, stage: Stage) -> str:
    """The start checkpoint as the fingerprint names it: relative to the run directory, so a copied or moved
    run still matches (its content is in `source_sha256`). A record made before this named the absolute path;
    one whose path ends in this run's source checkpoint is kept as written, so finished prunes stay done."""
    relative = f"{stage.source}/{ctx.run.checkpoint_dir(stage.source).name}"
    recorded = ctx.recorded_inputs(stage).get("model", {}).get("init")
    if isinstance(recorded, str) and Path(recorded).is_absolute() and Path(recorded).parts[-2:] == Path(relative).parts:
        return recorded
    return relative


def inputs(ctx: StageContext, stage: Stage) -> dict:
    trained = _stage_config(ctx, stage)
    trained = dataclasses.replace(trained, model=dataclasses.replace(trained.model, init=_recorded_init(ctx, stage)))
    return {"source_sha256": checkpoint_hash(ctx.run.checkpoint_dir(stage.source)),
            **teacher_inputs(ctx, stage), "prune": to_dict(ctx.config.distill.prune),
            **training_fingerprint_inputs(trained, ctx.config.seed, ctx.data())}


def run(ctx: StageContext, this: Stage) -> dict:
    config, run_dir, name = ctx.config, ctx.run, this.name
    cfg = config.distill.prune
    stage_cfg = _stage_config(ctx, this)
    extra = {"source": this.source, "source_sha256": checkpoint_hash(run_dir.checkpoint_dir(this.source)),
             "prune": to_dict(cfg)}
    setup = setup_training(config, run_dir, ctx.data(), stage_cfg, name, extra)
    kd = prepare_kd(ctx, this, setup)
    size, chans = this.spec.input_size, ctx.data().in_chans
    example = torch.zeros(1, chans, size, size)
    results: list[TrainResult] = []

    # `selftrain status` reads RUN/<stage>/progress.json; each fine-tuning loop writes its own under state/
    pruning = ProgressWriter(run_dir.stage_dir(name) / PROGRESS_FILE if setup.accelerator.is_main_process else None,
                             total=cfg.steps, start_step=0, every_s=0.0, unit="pruning step")

    def fine_tune(model: torch.nn.Module, step: int) -> None:
        pruning.update(step - 1)
        if cfg.fine_tune_steps == 0:
            return
        batches, stream_state = kd.batches(ctx, setup, cfg.fine_tune_steps, offset=(step - 1) * cfg.fine_tune_steps)
        state_dir = run_dir.state_dir(name) / f"step{step}"
        results.append(train(setup.accelerator, model, stage_cfg.train, cfg.fine_tune_steps, kd.steps_per_epoch,
                             batches, kd.loss_fn, state_dir=state_dir, name=f"{name} step {step}",
                             progress=config.runtime.progress, extra_state=stream_state))

    setup.accelerator.print(f"[{name}] pruning {this.spec.arch} from {this.source} to {cfg.target_macs:.0%} of its "
                            f"MACs in {cfg.steps} steps, {cfg.fine_tune_steps} KD steps after each")
    try:
        report = prune_to_macs(setup.model, example, cfg.target_macs, cfg.steps, fine_tune, round_to=cfg.round_to)
    except PruneError as error:
        raise PruneError(f"distill.prune.target_macs {cfg.target_macs:g} ({this.spec.arch}): {error}") from error
    pruning.update(cfg.steps)
    unpruned, _ = load_model(run_dir.checkpoint_dir(this.source), ctx.data().num_classes)
    pruned = setup.accelerator.unwrap_model(setup.model)
    speed = interleaved_torch_latency({"before": unpruned, "after": pruned}, (chans, size, size), batch=64,
                                      repeats=30, channels_last=setup.channels_last)
    before, after = speed["before"], speed["after"]
    result = results[-1] if results else TrainResult(0, 0, 0.0, 0.0, 0.0)
    ema = swap_in_ema(setup, result)  # the average of the last fine-tuning (each pruning step restarts it)
    logits = setup.test_logits()
    metrics = {**extra, **ema, "input_size": size, **teacher_comparison(setup, kd, logits, config.distill.temperature),
               "macs_before": report.macs_before, "macs_after": report.macs_after, "macs_ratio": report.macs_ratio,
               "params_before": report.params_before, "params_after": report.params_after,
               "per_step": report.per_step, "torch_latency_before": before, "torch_latency_after": after,
               "batch1_speedup": before["batch1_ms"] / after["batch1_ms"],
               "fine_tune_steps_total": sum(r.steps for r in results)}
    lineage = {"source": str(run_dir.checkpoint_dir(this.source)), **kd.teacher_lineage()}
    return finish(setup, result, lineage, metrics, logits=logits, save=save_pruned)
