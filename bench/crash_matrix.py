"""Crash matrix: SIGKILL the quick pipeline inside every stage, rerun it, compare with an uninterrupted run.

Reliability issue, item 7. Not a test (tests/test_crash_matrix.py runs a reduced matrix, marked slow).

On tiny synthetic Fashion-MNIST-like idx files made in a temp dir (10 classes, 28x28, the layout of
tests/conftest.py) and the tests' tiny teacher/student overrides (test_resnet at 16 px, one torch
thread, `runtime.workers` loader workers, small `save_every_steps`, several 100-image unlabeled
shards labeled in small batches):

1. the whole quick pipeline (data, teacher, pseudo_label_r1, select_r1, student_r1, report) runs
   once uninterrupted into a reference run dir; RUN/<stage>/wall_time.json gives each stage's time;
2. per stage and trial (random.Random("SEED-STAGE-TRIAL")): the same command starts in a fresh run
   dir in its own session; once RUN/<stage>/stage.json exists, it sleeps a random fraction of the
   stage's reference time and SIGKILLs either the whole process group (preemption) or only the main
   process (the OOM killer; loader workers live on a moment), alternately over the whole matrix (so
   each stage gets both kinds); the same command is rerun at once and must exit 0 (a lock refusal
   from dying workers is reported, never retried).
   A kill that would land after the stage finished is not made (the run completes, "finished before
   kill") and the next trial of that stage aims at an earlier moment; trials go on until `--trials`
   kills landed inside the stage (at most 2 * trials + 2 attempts);
3. after each rerun: data shards + manifests, label sidecars, selection plans byte-identical to the
   reference; teacher and student_r1 model.safetensors byte-identical (else the max abs difference
   per tensor); nothing named *.tmp under the run dir; every .tar iterates fully, every .npz /
   .json / .yaml / .safetensors / .png loads; no resume state left in a finished stage;
4. lost work: training stages: steps done at the kill (the killed run's progress bar, printed at
   every step via TQDM_MININTERVAL=0 / TQDM_MINITERS=1) minus the rerun's `resumed_from_step`
   (also cross-checked against the step saved in the killed run's state dir); pseudo-labeling:
   images labeled at the kill minus images in the sidecars that existed then, and whether the rerun
   left those sidecars untouched (same mtime) and relabeled only the others (`shards_this_run`).

Prints one JSON line per trial and a Markdown table; writes bench/results/crash_matrix.json.

Usage (repository root, project venv):
  python bench/crash_matrix.py                                  # full matrix, 3 kills a stage
  python bench/crash_matrix.py --stages teacher --trials 1      # one trial (development)
  python bench/crash_matrix.py --trials 4 --workers 1 --keep    # keep every run dir
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.data.sources.synthetic import write_fashion_like

sys.path.insert(0, str(Path(__file__).resolve().parent))  # crash_checks beside this script
from crash_checks import (compare_with_reference, integrity, last_progress, saved_step,  # noqa: E402
                          sidecar_images, sidecar_snapshot)

REPO = Path(__file__).resolve().parent.parent
KILL_STAGES = ("data", "teacher", "pseudo_label_r1", "select_r1", "student_r1")
ALL_STAGES = KILL_STAGES + ("report",)
TRAINING = {"teacher": "teacher.train.save_every_steps", "student_r1": "student.train.save_every_steps"}
LOCK_MESSAGE = "is in use by"

# the tests' tiny teacher and student (tests/conftest.py TINY_TEACHER, tests/test_student.py STUDENT),
# with one loader worker by default, one torch thread, several small unlabeled shards
TEACHER = ["teacher.model.arch=test_resnet", "teacher.model.input_size=16", "teacher.train.epochs=4",
           "teacher.train.batch_size=32", "teacher.train.lr=0.05", "teacher.train.save_every_steps=5",
           "teacher.train.warmup_epochs=1"]
STUDENT = ["student.model.arch=test_resnet", "student.model.input_size=16", "student.train.epochs=1",
           "student.train.batch_size=16", "student.train.lr=0.05", "student.train.save_every_steps=2",
           "student.train.warmup_epochs=0", "student.unlabeled_ratio=2", "select.per_class=20",
           "select.min_confidence=0.0", "student.model.init=teacher", "student.train.ema_decay=0.9"]


def write_config(path: Path, raw: Path, labels_per_class: int, shard_size: int) -> Path:
    path.write_text(f"seed: 0\ndata:\n  source: fashion-mnist\n  path: {raw}\n  labels_per_class: {labels_per_class}\n"
                    f"  shard_size: {shard_size}\n")
    return path


def overrides(args: argparse.Namespace) -> list[str]:
    return TEACHER + STUDENT + [f"select.per_class={args.select_per_class}",
                                f"pseudo_label.batch_size={args.label_batch}", f"runtime.workers={args.workers}",
                                "runtime.threads=1", "runtime.progress=true"]


def command(config: Path, run: Path, sets: list[str]) -> list[str]:
    return ([sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run)]
            + [x for item in sets for x in ("--set", item)])


def environment() -> dict[str, str]:
    # progress bars refresh at every step / batch, so the killed run's log says how far it got
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_to_end(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environment(), cwd=REPO,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -999
    _reap_group(proc.pid)
    return code, time.perf_counter() - t0


def _group_alive(pgid: int) -> int:
    """Processes of the group still running (zombies, killed but not yet reaped, do not count)."""
    alive = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive += 1
    return alive


def _reap_group(pgid: int) -> None:
    """Stragglers of a process group this script started (loader workers of a killed main)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---- one trial ------------------------------------------------------------------------------------------
def trial(args: argparse.Namespace, config: Path, ref: Path, ref_wall: dict[str, float], stage: str, index: int,
          attempt: int, scale: float, mode: str, workdir: Path) -> dict[str, Any]:
    rng = random.Random(f"{args.seed}-{stage}-{attempt}")
    fraction = rng.uniform(0.05, 0.95) * scale
    delay = fraction * ref_wall[stage]
    run = workdir / f"{stage}-{attempt}" / "run"
    run.parent.mkdir(parents=True)
    sets = overrides(args)
    cmd = command(config, run, sets)
    record: dict[str, Any] = {"stage": stage, "attempt": attempt, "mode": mode, "fraction": round(fraction, 4),
                              "delay_s": round(delay, 3), "run_dir": str(run)}
    killed_log, rerun_log = run.parent / "killed.log", run.parent / "rerun.log"
    t0 = time.perf_counter()
    with open(killed_log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environment(), cwd=REPO,
                                start_new_session=True)
        marker, done = run / stage / "stage.json", run / stage / "DONE"
        while not marker.exists() and proc.poll() is None and time.perf_counter() - t0 < args.timeout:
            time.sleep(0.002)
        started = time.perf_counter()
        if not marker.exists():
            try:
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _reap_group(proc.pid)
            record.update(outcome="stage never started", killed_rc=proc.returncode, ok=False,
                          log_tail=killed_log.read_text(errors="replace")[-1500:])
            return record
        time.sleep(delay)
        if proc.poll() is not None or done.exists():
            # too late: let it finish, count no kill, aim earlier next time
            proc.wait(timeout=args.timeout)
            _reap_group(proc.pid)
            record.update(outcome="finished before kill", killed_rc=proc.returncode, ok=proc.returncode == 0)
            return record
        if mode == "group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        record["killed_after_s"] = round(time.perf_counter() - started, 3)
    stage_dir = run / stage
    record["landed"] = "after stage DONE" if done.exists() else "inside stage"
    at_kill = sidecar_snapshot(stage_dir) if stage.startswith("pseudo_label") else {}
    steps_shown = last_progress(killed_log, stage) if stage in TRAINING else None
    state_step = saved_step(stage_dir) if stage in TRAINING else None
    images_shown = last_progress(killed_log, "pseudo-label") if stage.startswith("pseudo_label") else None
    imported_shown = last_progress(killed_log, "import") if stage == "data" else None
    files_at_kill = (len(list((run / "data").rglob("*.tar"))) if stage == "data"
                     else len(list(stage_dir.glob("*.plan.npz"))) if stage.startswith("select") else None)
    at_kill_images = sidecar_images(stage_dir, list(at_kill)) if at_kill else 0
    record["killed_processes_running_at_rerun"] = _group_alive(proc.pid)  # loader workers of a main-only kill

    code, seconds = run_to_end(cmd, rerun_log, args.timeout)
    _reap_group(proc.pid)  # any straggler of the killed run
    text = rerun_log.read_text(errors="replace")
    record.update(rerun_rc=code, rerun_s=round(seconds, 2))
    if code != 0:
        record.update(outcome="rerun failed", ok=False, lock_refused=LOCK_MESSAGE in text, log_tail=text[-2000:],
                      command=" ".join(cmd))
        return record
    record["outcome"] = "killed, rerun ok"
    comparison = compare_with_reference(run, ref)
    checks = integrity(run, ALL_STAGES)
    record.update(comparison=comparison, integrity=checks)
    wall = json.loads((stage_dir / "wall_time.json").read_text())
    record["invocations"] = wall.get("invocations")
    if stage in TRAINING:
        metrics = json.loads((stage_dir / "metrics.json").read_text())
        resumed = int(metrics.get("resumed_from_step", 0))
        save_every = int(next(s for s in sets if s.startswith(TRAINING[stage] + "=")).split("=")[1])
        lost = None if steps_shown is None else steps_shown - resumed
        record["lost"] = {"steps_at_kill": steps_shown, "state_step_at_kill": state_step, "resumed_from_step": resumed,
                          "steps_lost": lost, "save_every_steps": save_every,
                          "resumed_from_saved_state": state_step == resumed or (state_step is None and resumed == 0)}
        record["lost"]["within_bound"] = (record["lost"]["resumed_from_saved_state"]
                                          and (lost is None or 0 <= lost <= save_every))
    elif stage.startswith("pseudo_label"):
        metrics = json.loads((stage_dir / "metrics.json").read_text())
        after = sidecar_snapshot(stage_dir)
        rewritten = [n for n, m in at_kill.items() if after.get(n) != m]
        relabeled = int(metrics.get("shards_this_run", -1))
        shards = len(after)
        # one shard is in flight at a time: all its batches may be labeled while its sidecar is not yet written
        shard_images = max(sidecar_images(stage_dir, [name]) for name in after)
        lost_images = None if images_shown is None else images_shown - at_kill_images
        record["lost"] = {"sidecars_at_kill": len(at_kill), "shards_total": shards, "shards_relabeled": relabeled,
                          "sidecars_rewritten": rewritten, "images_labeled_at_kill": images_shown,
                          "images_in_sidecars_at_kill": at_kill_images, "images_lost": lost_images,
                          "within_bound": not rewritten and relabeled == shards - len(at_kill)
                          and (lost_images is None or 0 <= lost_images <= shard_images)}
    elif stage == "data":
        record["lost"] = {"images_imported_at_kill": imported_shown, "shards_on_disk_at_kill": files_at_kill,
                          "note": "an interrupted import is redone from its journal (all of it)"}
    else:
        record["lost"] = {"plans_on_disk_at_kill": files_at_kill, "note": "select is one pass; a kill redoes the stage"}
    identical = (not comparison["different"] and not comparison["missing"] and not comparison["extra"]
                 and all(m["identical"] for m in comparison["models"].values()))
    clean = not checks["tmp_files"] and not checks["unreadable"] and not checks["stages_not_done"]
    record["byte_identical"] = identical
    record["clean"] = clean
    record["ok"] = identical and clean and record["lost"].get("within_bound", True)
    return record


# ---- table ------------------------------------------------------------------------------------------
def summarize(trials: list[dict[str, Any]], stages: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for stage in stages:
        made = [t for t in trials if t["stage"] == stage and t["outcome"] in ("killed, rerun ok", "rerun failed")]
        kills = [t for t in made if t.get("landed") == "inside stage"]
        late = [t for t in made if t.get("landed") != "inside stage"]  # raced past the stage's DONE
        early = [t for t in trials if t["stage"] == stage and t["outcome"] == "finished before kill"]
        lost = []
        for t in kills:
            info = t.get("lost", {})
            if "steps_lost" in info and info["steps_lost"] is not None:
                lost.append((info["steps_lost"], f"{info['steps_lost']} steps (save every {info['save_every_steps']})"))
            elif "images_lost" in info and info["images_lost"] is not None:
                redone = len(info["sidecars_rewritten"]) + max(0, info["shards_relabeled"] - (
                    info["shards_total"] - info["sidecars_at_kill"]))
                lost.append((info["images_lost"], f"{info['images_lost']} images (shard in flight); "
                                                  f"{redone} finished sidecars redone"))
        worst = max(lost)[1] if lost else ("whole import (redone)" if stage == "data" else
                                           "whole stage (one pass)" if stage.startswith("select") else "n/a")
        rows.append({"stage": stage, "kills": len(kills), "kills_after_stage_done": len(late),
                     "group": sum(t["mode"] == "group" for t in kills), "main_only": sum(t["mode"] == "main" for t in kills),
                     "finished_before_kill": len(early),
                     "resumed_ok": sum(t.get("rerun_rc") == 0 for t in kills),
                     "byte_identical": sum(bool(t.get("byte_identical")) for t in kills),
                     "clean": sum(bool(t.get("clean")) for t in kills),
                     "leftover_state": sum(bool(t.get("integrity", {}).get("leftover_state")) for t in made),
                     "max_work_lost": worst, "failures": [t["attempt"] for t in made if not t.get("ok")]})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | kills (group / main-only) | resumed OK | byte-identical | no .tmp, every file loads | max work lost |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        extra = f", {r['finished_before_kill']} finished before kill" if r["finished_before_kill"] else ""
        extra += f", {r['kills_after_stage_done']} landed after DONE" if r["kills_after_stage_done"] else ""
        lines.append(f"| {r['stage']} | {r['kills']} ({r['group']} / {r['main_only']}){extra} | "
                     f"{r['resumed_ok']}/{r['kills']} | {r['byte_identical']}/{r['kills']} | {r['clean']}/{r['kills']} | "
                     f"{r['max_work_lost']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default=",".join(KILL_STAGES), help="comma-separated stages to kill in")
    p.add_argument("--trials", type=int, default=3, help="kills that must land inside each stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-mode", type=int, default=0, choices=(0, 1),
                   help="kills alternate over the matrix: 0: group, main, ...; 1: main, group, ...")
    p.add_argument("--workers", type=int, default=1, help="runtime.workers (1: a main-only kill leaves a worker)")
    p.add_argument("--select-per-class", type=int, default=40, help="select.per_class (student steps)")
    p.add_argument("--train-per-class", type=int, default=150, help="training images per class (pool = rest)")
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--labels-per-class", type=int, default=20)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--label-batch", type=int, default=25, help="pseudo_label.batch_size")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for any one pipeline invocation")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    p.add_argument("--keep", action="store_true", help="keep every run dir (failed trials are always kept)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "crash_matrix.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(stages) - set(KILL_STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; choose from {KILL_STAGES}")
    t_start = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crash_matrix_"))
    workdir.mkdir(parents=True, exist_ok=True)
    raw = write_fashion_like(workdir / "raw", args.train_per_class, args.test_per_class)
    config = write_config(workdir / "tiny.yaml", raw, args.labels_per_class, args.shard_size)
    ref = workdir / "reference" / "run"
    ref.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(config, ref, overrides(args))
    code, seconds = run_to_end(cmd, ref.parent / "run.log", args.timeout)
    if code != 0:
        print((ref.parent / "run.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise SystemExit(f"the uninterrupted reference run failed (rc {code}): {' '.join(cmd)}")
    ref_wall = {s: json.loads((ref / s / "wall_time.json").read_text())["seconds"] for s in ALL_STAGES
                if (ref / s / "wall_time.json").exists()}
    ref_integrity = integrity(ref, ALL_STAGES)
    print(json.dumps({"reference": str(ref), "seconds": round(seconds, 2), "stage_seconds": ref_wall,
                      "integrity": ref_integrity}), flush=True)
    trials: list[dict[str, Any]] = []
    landed = 0  # kills made inside their stage, all stages: the kind alternates over the whole matrix
    for stage in stages:
        scale, kills, attempt = 1.0, 0, 0
        while kills < args.trials and attempt < 2 * args.trials + 2:
            mode = ("group", "main")[(landed + args.first_mode) % 2]
            record = trial(args, config, ref, ref_wall, stage, kills, attempt, scale, mode, workdir)
            attempt += 1
            if record["outcome"] == "finished before kill" or record.get("landed") == "after stage DONE":
                scale *= 0.5
            if record["outcome"] in ("killed, rerun ok", "rerun failed") and record.get("landed") == "inside stage":
                kills += 1
                landed += 1
            trials.append(record)
            print(json.dumps(record, default=str), flush=True)
            if record.get("ok") and not args.keep:
                shutil.rmtree(Path(record["run_dir"]).parent, ignore_errors=True)
            if record["outcome"] == "stage never started":
                break
    rows = summarize(trials, stages)
    table = markdown(rows)
    total = time.perf_counter() - t_start
    failures = [t for t in trials if not t.get("ok")]
    result = {"command": " ".join(cmd).replace(str(ref), "RUN"), "workdir": str(workdir),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "reference": {"seconds": round(seconds, 2), "stage_seconds": ref_wall, "integrity": ref_integrity},
              "trials": trials, "summary": rows, "table": table, "failures": len(failures),
              "total_seconds": round(total, 1), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(table)
    print(f"total {total:.0f} s; {len(failures)} failed trial(s); results in {args.out}")
    if not failures and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
