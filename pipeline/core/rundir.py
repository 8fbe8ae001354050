"""The run directory: the one object that knows every path of a run.

Layout:
    RUN/lock                  held (flock) by the process using the run
    RUN/config.yaml           the resolved config of the latest invocation
    RUN/data/                 imported shards + manifest.json
    RUN/<stage>/stage.json    what the stage was started with (fingerprint, inputs)
    RUN/<stage>/DONE          written last; a rerun skips the stage
    RUN/<stage>/wall_time.json  seconds spent in the stage, summed over invocations (resumes)
    RUN/<stage>/progress.json   a training stage's step, total, saved step and rate (for status)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.core.atomic import ArtifactError, WriteFailed, read_json, read_json_object, write_json, write_text
from pipeline.core.owned import describe_foreign
from pipeline.core.provenance import provenance
from pipeline.core.progress import PROGRESS_FILE, Progress, read_progress
from pipeline.core.stage_files import FAILED_FILE, SIDECAR_SUFFIX, foreign_stage_files, shard_stem
from pipeline.core.wallclock import StageClock, format_duration, read_clock

MARKER = ".selftrain-run"
# what a run directory may hold before this marker existed (runs made by earlier versions)
LEGACY_MARKERS = ("lock", "config.yaml")


class RunDirError(RuntimeError):
    """The run directory is locked, or holds results made with other inputs."""


# Lock descriptors this process holds. A forked child (a DataLoader worker) closes its copies at
# once, so the lock dies with the process that took it: a main process killed by the OOM killer
# must not leave its still-exiting workers holding the run directory.
_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    for handle in _HELD_LOCKS:
        try:
            os.close(handle)  # the child's copy only; the parent's lock stays
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def describe_holder(recorded: str) -> str:
    """'pid N on HOST' from the lock file, saying so when that process (on this host) no longer runs."""
    words = recorded.split()  # "pid N on HOST"; "pid N" from runs made before the host was recorded
    try:
        pid = int(words[1])
    except (ValueError, IndexError):
        return "another process"
    if len(words) >= 4 and words[2] == "on" and words[3] != socket.gethostname():
        return recorded  # another machine sharing the run directory: its pids are not ours to look up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return (f"{recorded}, which is no longer running (a process it started still holds the lock; "
                "it should exit within seconds)")
    except PermissionError:
        pass
    return recorded


NOTHING_MADE = {"stage.json", "wall_time.json", FAILED_FILE, PROGRESS_FILE}  # a stage's bookkeeping, no work
FORGOTTEN = ".forgotten"  # RUN/.forgotten/: stages `--from` moved away, removed at once (kept only if it cannot)


class RunDir:
    def __init__(self, root: str | Path, data_path: str | Path | None = None):
        """`data_path`: an import outside the run (data.source "shards"); default RUN/data."""
        self.root = Path(root)
        self._data_path = Path(data_path) if data_path is not None else None
        self._lock_handle: int | None = None

    # ---- paths -------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def stage_list_path(self) -> Path:
        """The names of the run's stages in run order, written with config.yaml (read by `selftrain status`)."""
        return self.root / "stages.json"

    def planned_stages(self) -> list[str] | None:
        """The stage names the last run of this directory planned; None for a run made before stages.json."""
        if not self.stage_list_path.exists():
            return None
        found = read_json(self.stage_list_path)
        stages = found.get("stages") if isinstance(found, dict) else None
        if not (isinstance(stages, list) and all(isinstance(name, str) for name in stages)):
            raise ArtifactError(f"{self.stage_list_path}: not a list of stage names under 'stages' (damaged?); "
                                "the next `selftrain run` of this directory rewrites it")
        return stages

    def require_run_dir(self) -> None:
        """Refuse a path `selftrain run` did not make (for status and summarize, which only read).

        A run writes its marker and config.yaml before its first stage starts, so a run whose first
        stage has not finished passes; an empty directory, /tmp or a regular file does not."""
        if not self.root.exists():
            raise RunDirError(f"run directory {self.root} does not exist")
        if not self.root.is_dir():
            raise RunDirError(f"{self.root} is not a run directory (a file, not a directory)")
        if not (self.config_path.is_file() or (self.root / MARKER).is_file()):
            raise RunDirError(f"{self.root} is not a run directory (no config.yaml)")

    @property
    def data_dir(self) -> Path:
        """The imported data: RUN/data, or the import the config points at."""
        return self._data_path if self._data_path is not None else self.root / "data"

    def sidecar_path(self, labels_stage: str, shard_name: str) -> Path:
        """Pseudo-label sidecar of one unlabeled shard: `<shard stem>.labels.npz`."""
        return self.stage_dir(labels_stage) / (shard_stem(shard_name) + SIDECAR_SUFFIX)

    def sidecars_done(self, labels_stage: str) -> int:
        """Finished sidecars of a pseudo-label stage (every process's; a sidecar appears whole or not at all)."""
        return sum(1 for _ in self.stage_dir(labels_stage).glob("*" + SIDECAR_SUFFIX))

    def plan_path(self, select_stage: str, shard_name: str) -> Path:
        """Selection plan of one unlabeled shard: `<shard stem>.plan.npz` (keys + repeat counts)."""
        return self.stage_dir(select_stage) / (shard_stem(shard_name) + ".plan.npz")

    def manifest_path(self, stage: str) -> Path:
        """A stage's manifest.json, written last (pseudo-labels)."""
        return self.stage_dir(stage) / "manifest.json"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def checkpoint_dir(self, stage: str) -> Path:
        """model.safetensors + meta.json: what later stages (and users) load."""
        return self.stage_dir(stage) / "checkpoint"

    def state_dir(self, stage: str) -> Path:
        """accelerate save_state output: resumable training state."""
        return self.stage_dir(stage) / "state"

    def metrics_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "metrics.json"

    def logs_dir(self) -> Path:
        return self.root / "logs"

    # ---- lock --------------------------------------------------------------
    def acquire(self) -> None:
        """Take the run's lock or fail at once; the OS drops it if the process dies.

        A directory that exists, holds anything, and was not made by this tool is refused:
        a run writes and deletes files under its root."""
        self._refuse_foreign_root()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_text(self.root / MARKER, "selftrain run directory\n")
        except OSError as exc:
            raise RunDirError(f"run directory {self.root} is not writable ({exc.strerror}: {exc.filename}); "
                              "use another --run-dir") from None
        path = self.root / "lock"
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunDirError(f"run directory {self.root}: cannot open its lock file {path} "
                              f"({exc.strerror}); is the directory read-only?") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip()
            os.close(handle)
            raise RunDirError(f"run directory {self.root} is in use by {describe_holder(holder)}; "
                              "wait for it to finish or use another --run-dir") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        os.fsync(handle)  # other nodes read it back (the run directory check); NFS shows them only what was synced
        self._lock_handle = handle
        _HELD_LOCKS.add(handle)

    def check_usable(self) -> None:
        """Refuse, before anything runs, a directory that holds other files and is not a run directory (what
        taking the run would refuse): `selftrain compare` checks every pending job's up front."""
        self._refuse_foreign_root()

    def _refuse_foreign_root(self) -> None:
        if not self.root.exists() or (self.root / MARKER).exists():
            return
        if all((self.root / name).exists() for name in LEGACY_MARKERS):
            return
        if not self.root.is_dir():
            raise RunDirError(f"run directory {self.root} exists and is not a directory")
        present = sorted(p.name for p in self.root.iterdir())
        if present:
            raise RunDirError(f"{describe_foreign(self.root, present)} and is not a selftrain run directory; "
                              "nothing was changed. Use a new or empty --run-dir")

    def release(self) -> None:
        if self._lock_handle is not None:
            _HELD_LOCKS.discard(self._lock_handle)
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            os.close(self._lock_handle)
            self._lock_handle = None

    def __enter__(self) -> "RunDir":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- stage state -------------------------------------------------------
    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "DONE").exists()

    def stage_clock(self, stage: str) -> StageClock:
        """Times one invocation of a stage into wall_time.json, with heartbeats (a kill loses seconds only)."""
        return StageClock(self.stage_dir(stage) / "wall_time.json")

    def wall_seconds(self, stage: str) -> float | None:
        """Total seconds the stage has run (all invocations), None if never timed."""
        path = self.stage_dir(stage) / "wall_time.json"
        if not path.exists():
            return None
        seconds = read_json_object(path).get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ArtifactError(f"{path}: 'seconds' is {seconds!r}, not a number; the file is damaged: delete it "
                                "(the stage's time is then unknown)")
        return float(seconds)

    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        """The stage's metrics.json, with what made it (code revision, versions, device, processes)."""
        write_json(self.metrics_path(stage), {**metrics, "provenance": provenance()})

    def mark_done(self, stage: str) -> None:
        write_text(self.stage_dir(stage) / "DONE", "done\n")

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / "stage.json"
        return read_json_object(path) if path.exists() else None

    def begin_stage(self, stage: str, record: dict[str, Any]) -> None:
        """Record what the stage runs with, or refuse if earlier work used other inputs.

        `record` holds "fingerprint" plus readable "inputs"; a mismatch names the
        fields that differ so the user knows why the resume is refused.
        """
        previous = self.stage_record(stage)
        if previous is not None and previous.get("fingerprint") != record["fingerprint"]:
            diffs = input_differences(previous.get("inputs", {}), record.get("inputs", {}))
            if diffs or "inputs" not in previous:
                raise RunDirError(
                    f"stage '{stage}' in {self.root} was started with different inputs "
                    f"({'; '.join(diffs) or 'fingerprint differs'}). Rerun with --from {stage} to redo it "
                    "(and everything after it), or use a new --run-dir.")
        if previous is None and self.is_done(stage):
            raise RunDirError(f"stage '{stage}' in {self.root} is marked done but its record (stage.json) is gone, "
                              f"so what made it is unknown. Rerun with --from {stage} to redo it, or use a new "
                              "--run-dir")
        if previous is None:
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            write_json(self.stage_dir(stage) / "stage.json", record)

    def drop_training_state(self, stage: str) -> None:
        """A finished stage needs no resume state; its checkpoint is what stays."""
        for suffix in ("", ".tmp", ".prev"):
            path = self.state_dir(stage)
            shutil.rmtree(path.with_name(path.name + suffix), ignore_errors=True)

    def reset_stage(self, stage: str, kind: str | None = None) -> None:
        """Forget a stage completely; refuse if its directory holds files a stage (of `kind`) never writes."""
        self.reset_stages([(stage, kind)], flag=stage)

    def reset_stages(self, stages: list[tuple[str, str | None]], flag: str) -> None:
        """Forget every (stage, kind) of `--from {flag}`, or none: all directories are checked for files a
        stage never writes before the first is removed."""
        for stage, kind in stages:
            directory = self.stage_dir(stage)
            foreign = foreign_stage_files(directory, kind) if directory.exists() else []
            if foreign:
                raise RunDirError(f"--from {flag}: {describe_foreign(directory, foreign)}; nothing was removed. "
                                  "Move them out of the run directory first")
        trash = self.root / FORGOTTEN
        self._empty_trash()  # what an interrupted --from left there
        moved: list[Path] = []
        for stage, _ in stages:
            if not self.stage_dir(stage).exists():
                continue
            try:  # one rename a stage: a stage is forgotten whole or not at all (DONE never outlives stage.json)
                trash.mkdir(exist_ok=True)
                target = trash / f"{stage}.{os.getpid()}.{len(moved)}"
                self.stage_dir(stage).rename(target)
            except OSError as error:
                done = f"{', '.join(p.name.split('.')[0] for p in moved)} forgotten, " if moved else ""
                raise RunDirError(f"--from {flag}: cannot move {self.stage_dir(stage)} to {trash} ({error.strerror}); "
                                  f"{done}{stage} and the rest untouched. Fix that and rerun") from None
            moved.append(target)
        self._empty_trash()

    def _empty_trash(self) -> None:
        trash = self.root / FORGOTTEN
        if not trash.is_dir():
            return
        for target in trash.iterdir():
            shutil.rmtree(target, ignore_errors=True)
            if target.exists():
                print(f"warning: {target} (a forgotten stage's files) could not be removed entirely; delete it")
        with contextlib.suppress(OSError):
            trash.rmdir()

    def record_failure(self, stage: str, error: Exception) -> None:
        """Keep the error that stopped `stage`, so `selftrain status` can say why it is not done; best effort
        (a full disk must not replace the error being raised)."""
        try:
            if self.stage_dir(stage).exists():
                write_json(self.stage_dir(stage) / FAILED_FILE, {"error": f"{type(error).__name__}: {error}"})
        except (OSError, WriteFailed):
            pass

    def forget_if_nothing_made(self, stage: str) -> None:
        """A stage that failed before it wrote anything keeps no record of its inputs: the corrected config (a
        path fixed) then runs, where it was refused as other inputs with advice to redo everything after it."""
        directory = self.stage_dir(stage)
        if directory.is_dir() and {p.name for p in directory.iterdir()} <= NOTHING_MADE:
            (directory / "stage.json").unlink(missing_ok=True)

    def clear_failure(self, stage: str) -> None:
        (self.stage_dir(stage) / FAILED_FILE).unlink(missing_ok=True)

    def stage_state(self, stage: str) -> str:
        """done | pending | running (a process times it now) | failed (its error) | resumable / started
        (interrupted), with times."""
        if self.is_done(stage):
            return "done"
        if not self.stage_dir(stage).exists():
            return "pending"
        clock = read_clock(self.stage_dir(stage) / "wall_time.json")
        progress = read_progress(self.stage_dir(stage) / PROGRESS_FILE)
        if progress is not None and progress[0].unit == "shard":
            progress = self._live_shard_count(stage, progress[0])
        if clock is not None and clock[1]:
            where = "" if progress is None else f"; {progress[0].running_text(progress[1])}"
            return f"running ({format_duration(clock[0])} so far{where})"
        saved = progress is not None and progress[0].saved_step > 0  # a state, or finished sidecars
        failed = self.stage_dir(stage) / FAILED_FILE
        if failed.exists():
            recorded = read_json(failed)
            error = str(recorded.get("error", "")) if isinstance(recorded, dict) else repr(recorded)
            error = error if len(error) <= 300 else error[:297] + "..."
            kept = f"; {progress[0].stopped_text()}" if progress is not None and saved else ""
            return f"failed ({error}{kept}; fix the cause and rerun)"
        state = "resumable" if self.state_dir(stage).exists() or saved else "started"
        if clock is None:
            return state
        where = f", {progress[0].stopped_text()}" if progress is not None and saved else ""
        return f"{state} (stopped after {format_duration(clock[0])}{where}; rerun to resume)"

    def _live_shard_count(self, stage: str, written: Progress) -> tuple[Progress, float]:
        """Pseudo-labeling's count from the sidecars on disk, not from the file: only the main process
        writes the file, so under several processes it stops moving once the main process's shards
        are done while the others still label theirs. Age 0: the count is of now."""
        done = self.sidecars_done(stage)
        return replace(written, step=done, saved_step=done), 0.0


def input_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable `key: old -> new` lines; a setting added to the config since (null) is no difference."""
    flat_old, flat_new = flatten_keys(old), flatten_keys(new)
    return [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in sorted(set(flat_old) | set(flat_new))
            if flat_old.get(k) != flat_new.get(k) and not (k not in flat_old and flat_new.get(k) is None)]


def flatten_keys(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as `{"a.b.c": value}` (stage inputs, configs)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten_keys(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}
