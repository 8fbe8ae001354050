import json
import subprocess
import sys
import textwrap

import pytest

from pipeline.core.rundir import RunDir, RunDirError
from pipeline.core.stage_files import foreign_stage_files


def test_lock_refuses_a_second_process(tmp_path):
    with RunDir(tmp_path / "run"):
        code = textwrap.dedent(f"""
            from pipeline.core.rundir import RunDir, RunDirError
            try:
                RunDir({str(tmp_path / 'run')!r}).acquire()
            except RunDirError as exc:
                print("REFUSED", exc)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "REFUSED" in out and "in use by pid" in out
    # released: a new holder gets it
    with RunDir(tmp_path / "run"):
        pass


def test_lock_is_dropped_when_holder_is_killed(tmp_path):
    code = f"from pipeline.core.rundir import RunDir; import os, signal; RunDir({str(tmp_path / 'r')!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    subprocess.run([sys.executable, "-c", code])
    with RunDir(tmp_path / "r"):
        pass


def test_stage_record_mismatch_names_the_difference(tmp_path):
    run = RunDir(tmp_path)
    run.begin_stage("teacher", {"fingerprint": "a", "inputs": {"model": {"arch": "resnet18"}}})
    run.begin_stage("teacher", {"fingerprint": "a", "inputs": {"model": {"arch": "resnet18"}}})
    with pytest.raises(RunDirError, match=r"model.arch: 'resnet18' -> 'resnet34'.*--from teacher"):
        run.begin_stage("teacher", {"fingerprint": "b", "inputs": {"model": {"arch": "resnet34"}}})


def test_done_and_states(tmp_path):
    run = RunDir(tmp_path)
    assert run.stage_state("teacher") == "pending"
    run.begin_stage("teacher", {"fingerprint": "a", "inputs": {}})
    assert run.stage_state("teacher") == "started"
    run.mark_done("teacher")
    assert run.is_done("teacher") and run.stage_state("teacher") == "done"


def test_a_setting_added_later_with_null_default_does_not_refuse_old_runs(tmp_path):
    run = RunDir(tmp_path)
    run.begin_stage("data", {"fingerprint": "old", "inputs": {"seed": 0}})
    run.begin_stage("data", {"fingerprint": "new", "inputs": {"seed": 0, "max_unlabeled": None}})
    with pytest.raises(RunDirError, match="max_unlabeled: None -> 5"):
        run.begin_stage("data", {"fingerprint": "newer", "inputs": {"seed": 0, "max_unlabeled": 5}})


def test_wall_time_counts_an_invocation_killed_midway(tmp_path):
    import json

    path = tmp_path / "stage" / "wall_time.json"
    code = textwrap.dedent(f"""
        import json, os, signal, sys, time
        from pathlib import Path
        from pipeline.core.wallclock import StageClock
        path = Path({str(path)!r})
        with StageClock(path, heartbeat_s=0.05):
            # killed once a heartbeat has written 0.4 s: on a loaded machine the heartbeat thread may run late,
            # and what is tested is that a kill keeps what the heartbeats wrote, not when the thread runs
            deadline = time.monotonic() + 20
            while json.loads(path.read_text())["seconds"] < 0.4:
                if time.monotonic() > deadline:
                    sys.exit("no heartbeat wrote 0.4 s within 20 s")
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    killed = json.loads(path.read_text())
    assert killed["running"] and killed["invocations"] == 1 and killed["seconds"] >= 0.4
    from pipeline.core.wallclock import StageClock
    with StageClock(path, heartbeat_s=0.05):
        pass
    resumed = json.loads(path.read_text())
    assert not resumed["running"] and resumed["invocations"] == 2 and resumed["seconds"] >= killed["seconds"]


@pytest.mark.parametrize("stage, kind, files", [
    ("export", "export", ["distill_x.onnx", "distill_x.int8.onnx", "teacher.onnx", "deployment.md", "pareto.png",
                          "metrics.json", "DONE", "metrics.json.tmp"]),
    ("distill_x", "distill", ["checkpoint/model.safetensors", "peer/model.safetensors", "peer/meta.json",
                              "state/x.bin", "state/step1/y.bin", "checkpoint/meta.json.tmp"]),
])
def test_every_file_a_stage_writes_is_its_own_for_from(tmp_path, stage, kind, files):
    """`--from` must be able to remove what the export and distill stages write (ONNX files, the peer)."""
    for name in files:
        (tmp_path / stage / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stage / name).write_bytes(b"x")
    (tmp_path / stage / "mine.txt").write_text("a user's file")
    assert foreign_stage_files(tmp_path / stage, kind) == ["mine.txt"]


def test_files_of_another_stage_kind_or_in_a_sub_folder_are_the_users(tmp_path):
    """A plot or an ONNX copy in a teacher's directory, a backup folder in its checkpoint/: the teacher writes
    none of them, so `--from` must not remove them (one list for every stage, and * crossing "/", did)."""
    mine = ["my_comparison.png", "my_model.onnx", "notes.md.tmp", "checkpoint/old_good/model.safetensors",
            "sub/unlabeled-000000.labels.npz"]
    for name in mine + ["checkpoint/model.safetensors", "state/step1/optimizer.bin"]:
        (tmp_path / "teacher" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "teacher" / name).write_bytes(b"x")
    assert foreign_stage_files(tmp_path / "teacher", "teacher") == sorted(mine)


def test_from_checks_every_stage_it_forgets_before_removing_any(tmp_path):
    run = RunDir(tmp_path)
    for stage in ("teacher", "student_r1"):
        run.begin_stage(stage, {"fingerprint": "a", "inputs": {}})
        run.mark_done(stage)
    (run.stage_dir("student_r1") / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"--from teacher: .*student_r1 holds .*notes.txt.*nothing was removed"):
        run.reset_stages([("teacher", "teacher"), ("student_r1", "student")], flag="teacher")
    assert run.is_done("teacher") and run.is_done("student_r1")  # the teacher was removed before the refusal


def test_a_stage_from_cannot_remove_is_forgotten_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    """rmtree stopped inside a read-only folder (a busy NFS file, Ctrl-C) and left DONE and the old checkpoint
    without stage.json; the next run wrote a new record from its own config and skipped the stage as done."""
    run = RunDir(tmp_path / "run")
    for stage in ("teacher", "student_r1"):
        run.begin_stage(stage, {"fingerprint": "a", "inputs": {}})
        (run.stage_dir(stage) / "checkpoint").mkdir()
        (run.stage_dir(stage) / "checkpoint" / "model.safetensors").write_bytes(b"w")
        run.mark_done(stage)

    def rmtree_stopping_in_checkpoint(path, ignore_errors=False, onerror=None):
        (path / "DONE").unlink()  # removal under way, then a file it cannot remove
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path / "checkpoint" / "model.safetensors"))

    with monkeypatch.context() as patched:
        patched.setattr("pipeline.core.rundir.shutil.rmtree", rmtree_stopping_in_checkpoint)
        run.reset_stages([("teacher", "teacher"), ("student_r1", "student")], flag="teacher")
    assert not run.stage_dir("teacher").exists() and not run.stage_dir("student_r1").exists()
    assert "could not be removed entirely; delete it" in capsys.readouterr().out
    run.reset_stages([("teacher", "teacher")], flag="teacher")  # the next --from clears what was left
    assert not (run.root / ".forgotten").exists()
    run.begin_stage("teacher", {"fingerprint": "b", "inputs": {}})  # a fresh record: the stage runs anew
    assert not run.is_done("teacher")
    (run.stage_dir("teacher") / "stage.json").unlink()
    run.mark_done("teacher")  # DONE without its record: refused, not recorded as the new config's
    with pytest.raises(RunDirError, match="marked done but its record \\(stage.json\\) is gone"):
        run.begin_stage("teacher", {"fingerprint": "c", "inputs": {}})


def test_status_tells_a_running_stage_from_an_interrupted_one(tmp_path):
    """`selftrain status` said "resumable" for the stage a live process was training; the clock's heartbeat tells."""
    import os
    import time

    run = RunDir(tmp_path)
    run.begin_stage("teacher", {"fingerprint": "a", "inputs": {}})
    run.state_dir("teacher").mkdir()
    with run.stage_clock("teacher"):
        assert run.stage_state("teacher").startswith("running (")
    assert run.stage_state("teacher").startswith("resumable (stopped after ")
    # a SIGKILL leaves "running": true behind, and the heartbeats stop
    clock = tmp_path / "teacher" / "wall_time.json"
    clock.write_text('{"seconds": 4000.0, "invocations": 1, "running": true}')
    assert run.stage_state("teacher") == "running (1 h 06 min so far)"
    old = time.time() - 120
    os.utime(clock, (old, old))
    assert run.stage_state("teacher") == "resumable (stopped after 1 h 06 min; rerun to resume)"


def test_status_shows_a_training_stage_s_step_time_left_and_where_it_resumes(tmp_path):
    """A multi-hour stage: which step, about how long is left, and from which step a rerun goes on."""
    import os
    import time

    from pipeline.core.progress import ProgressWriter, progress_path

    run = RunDir(tmp_path)
    run.begin_stage("teacher", {"fingerprint": "a", "inputs": {}})
    run.state_dir("teacher").mkdir()
    clock = tmp_path / "teacher" / "wall_time.json"
    clock.write_text('{"seconds": 4000.0, "invocations": 1, "running": true}')
    writer = ProgressWriter(progress_path(run.state_dir("teacher")), total=8448, start_step=0, every_s=3600)
    writer.update(200, saved=True)
    writer.update(280)  # within every_s of the last write: not written
    progress = json.loads((tmp_path / "teacher" / "progress.json").read_text())
    assert progress["step"] == 200 and progress["saved_step"] == 200 and progress["total"] == 8448
    (tmp_path / "teacher" / "progress.json").write_text(
        '{"step": 280, "total": 8448, "saved_step": 200, "steps_per_s": 1.0}')
    assert run.stage_state("teacher") == "running (1 h 06 min so far; step 280 of 8,448, about 2 h 16 min left)"
    old = time.time() - 120
    os.utime(clock, (old, old))
    assert run.stage_state("teacher") == ("resumable (stopped after 1 h 06 min, resumes from step 200 of 8,448; "
                                          "rerun to resume)")
    (tmp_path / "teacher" / "progress.json").write_text("{not json")  # status never fails on this file
    assert run.stage_state("teacher") == "resumable (stopped after 1 h 06 min; rerun to resume)"
    assert foreign_stage_files(tmp_path / "teacher") == []


def test_status_counts_pseudo_label_shards_on_disk_not_only_the_main_process_s(tmp_path):
    """Under torchrun only the main process writes progress.json; the other processes' sidecars count too."""
    run = RunDir(tmp_path)
    run.begin_stage("pseudo_label_r1", {"fingerprint": "a", "inputs": {}})
    (tmp_path / "pseudo_label_r1" / "wall_time.json").write_text('{"seconds": 600.0, "invocations": 1, "running": true}')
    (tmp_path / "pseudo_label_r1" / "progress.json").write_text(
        '{"step": 1, "total": 4, "saved_step": 1, "steps_per_s": 0.01, "unit": "shard"}')
    for name in ("unlabeled-000000.tar", "unlabeled-000001.tar", "unlabeled-000002.tar"):
        run.sidecar_path("pseudo_label_r1", name).write_bytes(b"")
    assert run.stage_state("pseudo_label_r1") == "running (10 min so far; shard 3 of 4, about 1 min left)"


def test_status_of_a_run_made_before_stages_json_comes_from_its_config(tmp_path, capsys):
    """Run directories of earlier versions have config.yaml but no stages.json: the graph of that config."""
    from pipeline.cli import main

    run = RunDir(tmp_path / "old")
    run.root.mkdir()
    run.config_path.write_text("student:\n  rounds: 2\n")
    run.stage_dir("teacher").mkdir()
    run.mark_done("teacher")
    assert main(["status", str(run.root)]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert [name for name, _ in rows][:8] == ["data", "teacher", "pseudo_label_r1", "select_r1", "student_r1",
                                              "pseudo_label_r2", "select_r2", "student_r2"]
    assert dict(rows)["teacher"] == "done" and dict(rows)["data"] == "pending"


def test_a_lock_holder_on_another_host_is_not_called_dead():
    """A run directory on shared storage: a pid recorded by another machine is not looked up here."""
    from pipeline.core.rundir import describe_holder
    assert describe_holder("pid 999999999 on some-other-node") == "pid 999999999 on some-other-node"
    import socket
    assert "no longer running" in describe_holder(f"pid 999999999 on {socket.gethostname()}")
    assert "no longer running" in describe_holder("pid 999999999")  # a lock written before hosts were recorded


@pytest.mark.parametrize("name, text", [("stages.json", "{}"), ("stages.json", "[]"), ("teacher/failed.json", '"boom"'),
                                        ("teacher/wall_time.json", '{"seconds": "x"}'),
                                        ("teacher/wall_time.json", "[1, 2]")])
def test_status_on_a_damaged_bookkeeping_file_names_it_or_shows_it(tmp_path, capsys, name, text):
    from pipeline.cli import main
    run = RunDir(tmp_path / "run")
    run.acquire()
    run.release()
    (run.root / "config.yaml").write_text("seed: 0\n")
    run.begin_stage("teacher", {"fingerprint": "a", "inputs": {}})
    (run.root / name).write_text(text)
    code = main(["status", str(run.root)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if name == "stages.json":
        assert code == 2 and "stages.json: not a list of stage names" in captured.err
    elif name == "teacher/failed.json":
        assert code == 0 and "failed ('boom'" in captured.out
    else:  # a damaged clock: no time shown, as for an unreadable file
        assert code == 0 and "teacher" in captured.out


def test_a_shard_an_import_was_writing_when_killed_is_its_own(tmp_path):
    """A kill during the import leaves unlabeled-000001.tar.tmp: `--from data` refused it as a user's file,
    and that was the command the refusal of changed data settings said to run."""
    from pipeline.core.owned import claim

    data = tmp_path / "data"
    data.mkdir()
    claim(data, ["manifest.json", "unlabeled/unlabeled-000001.tar"])
    (data / "unlabeled").mkdir()
    (data / "unlabeled" / "unlabeled-000001.tar.tmp").write_bytes(b"part")
    (data / "unlabeled" / "notes.txt").write_text("mine")
    assert foreign_stage_files(data, "data") == ["unlabeled/notes.txt"]


def test_a_running_clock_reads_the_time_since_its_last_heartbeat_too(tmp_path):
    """status showed '0 s so far' 7 s into a stage: the seconds are written once a heartbeat (10 s)."""
    import json
    import os
    import time

    from pipeline.core.wallclock import read_clock

    path = tmp_path / "wall_time.json"
    path.write_text(json.dumps({"seconds": 5.0, "invocations": 1, "running": True}))
    beat = time.time() - 4
    os.utime(path, (beat, beat))
    seconds, running = read_clock(path)
    assert running and 8.9 < seconds < 10
    path.write_text("[1, 2]")  # damaged: nothing to show, not a traceback
    assert read_clock(path) is None


def test_an_export_owns_the_files_of_the_models_it_recorded_not_every_onnx(tmp_path):
    """`--from export` removed a user's `teacher_v1_keep.onnx` (a copy kept beside the export): every `*.onnx`
    counted as the stage's. An export that recorded its models owns their four files and no other."""
    run = RunDir(tmp_path)
    run.begin_stage("export", {"fingerprint": "a", "inputs": {"models": {"student_r1": "h1", "distill_x[1]": "h2"}}})
    ours = ["student_r1.onnx", "student_r1.int8.onnx", "student_r1.onnx.tmp", "distill_x[1].onnx",
            "distill_x[1].int8.onnx.data", "deployment.md", "pareto.png"]
    mine = ["teacher_v1_keep.onnx", "student_r1.fp16.onnx", "distill_x1.onnx"]
    for name in ours + mine:
        (run.stage_dir("export") / name).write_bytes(b"x")
    assert foreign_stage_files(run.stage_dir("export"), "export") == sorted(mine)
    with pytest.raises(RunDirError, match=r"--from export: .*teacher_v1_keep.onnx.*nothing was removed"):
        run.reset_stages([("export", "export")], flag="export")
    assert (run.stage_dir("export") / "teacher_v1_keep.onnx").exists()


def test_a_stage_killed_in_its_first_seconds_shows_the_seconds_it_ran(tmp_path):
    """The first heartbeat came after 10 s, so `status` said 0 s for a stage killed before it."""
    import time

    from pipeline.core.wallclock import StageClock

    path = tmp_path / "wall_time.json"
    clock = StageClock(path)  # the default heartbeat of 10 s
    clock.__enter__()
    time.sleep(2.5)
    written = json.loads(path.read_text())["seconds"]  # what a SIGKILL now would leave
    clock.__exit__(None, None, None)
    assert written >= 1.0


def test_summarize_names_a_metrics_file_of_the_wrong_json_type(tmp_path, capsys):
    """A metrics.json holding a list gave a TypeError traceback in summarize."""
    from pipeline.cli import main
    run = RunDir(tmp_path / "run")
    run.acquire()
    run.release()
    (run.root / "config.yaml").write_text("seed: 0\n")
    run.stage_dir("teacher").mkdir()
    run.mark_done("teacher")
    run.metrics_path("teacher").write_text("[1, 2]")
    assert main(["summarize", str(run.root)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "metrics.json: holds a JSON list, not an object; the file is damaged" in err
