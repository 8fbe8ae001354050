"""A resumable accelerate training loop shared by every training stage.

The stage supplies the model, a batch source that can start at any step,
and a function returning a dict of loss terms ("loss" is optimised, the rest
are logged). State (model, optimizer, scheduler, step, RNG) is saved every
`save_every_steps` with `accelerator.save_state` into `state.tmp` and then
swapped in, so a kill at any moment leaves one complete state on disk.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from accelerate import Accelerator

from pipeline.config.sections import TrainConfig
from pipeline.engine.ema import WeightEma
from pipeline.engine.per_rank import PerRankState, take_main_process_copy
from pipeline.engine.small_map_conv import small_map_weight_grads
from pipeline.core.atomic import WriteFailed
from pipeline.core.bars import progress_bar
from pipeline.core.faults import kill_point
from pipeline.core.progress import ProgressWriter, progress_path

LOG_EVERY = 10
LossFn = Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]


@dataclass
class TrainProgress:
    """Registered with accelerate so the step count and loss history are saved with the state."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.history = list(state.get("history", []))


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    seconds: float
    images_per_s: float
    data_wait_fraction: float
    last_losses: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # losses every `log_every` steps
    ema: WeightEma | None = None  # the moving average, when train.ema_decay is set


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on biases and norm parameters (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _state_path(state_dir: Path) -> Path | None:
    """The complete state to resume from, if any (`state.prev` survives a kill mid-swap)."""
    previous = state_dir.with_name(state_dir.name + ".prev")
    if state_dir.exists():
        return state_dir
    return previous if previous.exists() else None


def _errno_of(error: Exception) -> int | None:
    """An OSError's errno, or the one safetensors' writer reports in its message ("... (os error 28)")."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None


FULL_DISK_BYTES = 16 << 20  # what is left free when a write failed for want of space (blocks are reserved)


def _disk_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < FULL_DISK_BYTES
    except OSError:
        return False


def _save_state(accelerator: Accelerator, state_dir: Path) -> None:
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    previous = state_dir.with_name(state_dir.name + ".prev")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except Exception as exc:  # torch.save on a full disk raises RuntimeError ("unexpected pos"), not OSError
        code = _errno_of(exc) or (errno.ENOSPC if _disk_full(tmp.parent) else None)
        shutil.rmtree(tmp, ignore_errors=True)  # the last complete state stays; nothing partial is left
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise WriteFailed(f"cannot save the training state to {tmp}: {errno.errorcode[code]} "
                              f"({os.strerror(code)}); the previous state in {state_dir} is intact") from None
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if state_dir.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(state_dir, previous)
        os.replace(tmp, state_dir)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()


def train(accelerator: Accelerator, model: torch.nn.Module, cfg: TrainConfig, total_steps: int,
          steps_per_epoch: int, batches: Callable[[int], Iterable[Any]], loss_fn: LossFn,
          state_dir: Path, name: str, progress: bool = True,
          extra_state: Sequence[Any] = ()) -> TrainResult:
    """Train `model` in place for `total_steps`, resuming from `state_dir` when it holds a state.

    `batches(start_step)` must yield the batches for steps start_step..total_steps-1 (each with
    `len()` = images on this rank). `extra_state` objects (state_dict/load_state_dict) are saved
    and restored with the training state, e.g. running loss averages.
    """
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    compiled = hasattr(model, "_orig_mod") or hasattr(getattr(model, "module", None), "_orig_mod")
    if compiled:
        accelerator.print(f"[{name}] model compiled with torch.compile ({accelerator.state.dynamo_plugin.backend})")
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if 0 < total_steps <= warmup:
        accelerator.print(f"[{name}] warning: the warm-up ({warmup} steps: warmup_epochs {cfg.warmup_epochs} x "
                          f"{steps_per_epoch} steps an epoch) is as long as the run ({total_steps} steps), so the "
                          "learning rate only rises and never decays; lower warmup_epochs")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    state = TrainProgress()
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = WeightEma(raw_model, cfg.ema_decay) if cfg.ema_decay else None
    # extra state (loss averages, a pool stream position) is each process's own: saved for every rank
    own_states = [PerRankState(obj, type(obj).__name__) for obj in extra_state]
    accelerator.register_for_checkpointing(scheduler, state, *own_states, *([ema] if ema else []))
    resume = _state_path(state_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"[{name}] resuming from step {state.step}/{total_steps} ({resume})")
    start = state.step
    progress_file = ProgressWriter(progress_path(state_dir) if accelerator.is_main_process else None,
                                   total_steps, start)
    bar = progress_bar(total=total_steps, initial=start, desc=name, unit="step", dynamic_ncols=True,
                       disable=not (progress and accelerator.is_local_main_process))
    model.train()
    images, wait, t0 = 0, 0.0, time.perf_counter()
    last: dict[str, float] = {}
    tick = time.perf_counter()
    # CPU, eager: weight gradients on small maps by shifts / per-tap GEMMs (oneDNN's take 10-50x the forward pass there)
    speedup = small_map_weight_grads(raw_model) if accelerator.device.type == "cpu" and not compiled else nullcontext()
    with speedup:
        for batch in batches(start):
            wait += time.perf_counter() - tick
            losses = loss_fn(model, batch)
            accelerator.backward(losses["loss"])
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16: a step GradScaler skipped moves no schedule
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw_model)
            state.step += 1
            images += len(batch) * accelerator.num_processes
            if state.step % LOG_EVERY == 0 or state.step == total_steps:
                last = {k: float(v.detach()) for k, v in losses.items()}
                state.history.append({"step": state.step, **{k: round(v, 5) for k, v in last.items()}})
                rate = images / max(1e-9, time.perf_counter() - t0)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", refresh=False)
                accelerator.log({f"{name}/{k}": v for k, v in last.items()} | {f"{name}/lr": lr,
                                f"{name}/images_per_s": rate, "epoch": state.step / steps_per_epoch},
                                step=state.step)
            bar.update(1)
            if state.step % cfg.save_every_steps == 0 and state.step < total_steps:
                _save_state(accelerator, state_dir)
                progress_file.update(state.step, saved=True)
            else:
                progress_file.update(state.step)
            kill_point("step", state.step)
            tick = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - t0
    # every rank evaluates (its slice of) what rank 0 saves: rank 0's batch-norm statistics and weight average
    take_main_process_copy([*raw_model.buffers(), *(ema.shadow.values() if ema is not None else ())])
    return TrainResult(steps=state.step, resumed_from=start, seconds=seconds,
                       images_per_s=images / max(1e-9, seconds),
                       data_wait_fraction=wait / max(1e-9, seconds), last_losses=last,
                       history=state.history, ema=ema)
