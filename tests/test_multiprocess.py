"""The whole quick pipeline under torchrun and accelerate launch, 2 CPU processes (gloo).

Every stage passes the barriers between stages (the process group belongs to the
runner, not to a stage) and writes its artifacts once. The pseudo-label sidecars equal
those of one process labeling with the same teacher, byte for byte. (The teacher itself
differs from a one-process teacher in the last bits: each DDP rank normalises its own
half batch, so the comparison holds the teacher fixed.)
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_TEACHER, set_args, tiny_config
from test_student import STUDENT

STAGES = ["data", "teacher", "pseudo_label_r1", "select_r1", "student_r1", "report"]


def pipeline_args(config: Path, run: Path) -> list[str]:
    return ["run", str(config), "--run-dir", str(run)] + set_args(TINY_TEACHER + STUDENT + ["runtime.threads=1"])


def run_cli(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(launcher + ["-m", "pipeline.cli"] + args, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def sidecar_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "pseudo_label_r1").glob("*.labels.npz"))}


def assert_metrics_are_the_saved_models(run: Path, stage: str) -> None:
    """The recorded test NLL is that of the saved checkpoint, evaluated here in one process (each rank used to
    evaluate its own batch-norm statistics and weight average, not rank 0's, which it saves)."""
    import numpy as np
    import torch

    from augment import build_eval_transform
    from pipeline.config.loading import load_config
    from pipeline.data.imageset import load_labeled_split, open_data
    from pipeline.engine.predict import load_model

    test = load_labeled_split(open_data(Path(load_config(run / "config.yaml").data.path)), "test")
    model, meta = load_model(run / stage / "checkpoint")
    transform = build_eval_transform(meta.input_size)
    x = torch.from_numpy(np.stack([transform(image) for image in test.images])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(meta.mean).view(1, -1, 1, 1)) / torch.tensor(meta.std).view(1, -1, 1, 1)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model.eval()(x), torch.from_numpy(test.labels).long()).item()
    assert abs(nll - json.loads((run / stage / "metrics.json").read_text())["nll"]) < 1e-4, stage


@pytest.fixture
def config(tiny_data, tmp_path) -> Path:
    return tiny_config(tmp_path, tiny_data)


def one_process_sidecars(config: Path, run: Path, tmp_path: Path) -> dict[str, bytes]:
    """Sidecars of one process labeling with the teacher of `run`."""
    reference = tmp_path / "one_process"
    reference.mkdir()
    for item in ("data", "teacher", "config.yaml", ".selftrain-run"):
        copy = shutil.copytree if (run / item).is_dir() else shutil.copy
        copy(run / item, reference / item)
    result = run_cli([sys.executable], pipeline_args(config, reference) + ["--only", "pseudo_label_r1"])
    assert result.returncode == 0, result.stderr[-3000:]
    return sidecar_bytes(reference)


def assert_complete_two_process_run(config: Path, run: Path, output: str, tmp_path: Path, nodes: int = 1) -> None:
    for stage in STAGES:
        assert (run / stage / "DONE").exists(), f"{stage} not done:\n{output[-3000:]}"
    for stage in STAGES[:-1]:  # fingerprinted stages ran once, in one invocation
        assert json.loads((run / stage / "wall_time.json").read_text())["invocations"] == 1
    assert not list(run.rglob("*.tmp")), "a partial file was left under the run directory"
    for stage in ("teacher", "pseudo_label_r1", "student_r1"):
        metrics = json.loads((run / stage / "metrics.json").read_text())
        assert metrics["provenance"]["num_processes"] == 2
    assert output.count("[teacher] test top-1") == nodes  # printed by each node's first process
    for stage in ("teacher", "student_r1"):  # the student keeps a weight average (STUDENT sets ema_decay)
        assert_metrics_are_the_saved_models(run, stage)
    assert sidecar_bytes(run) == one_process_sidecars(config, run, tmp_path)


def test_quick_pipeline_under_torchrun(config, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    result = run_cli(torchrun, pipeline_args(config, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete_two_process_run(config, tmp_path / "run", result.stdout + result.stderr, tmp_path)


def test_quick_pipeline_under_accelerate_launch(config, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29543"]
    result = run_cli(launch, pipeline_args(config, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete_two_process_run(config, tmp_path / "run", result.stdout + result.stderr, tmp_path)


def test_quick_pipeline_over_two_nodes_on_localhost(config, tmp_path):
    """Two torchrun launchers (one process each) meet through a c10d rendezvous on 127.0.0.1, as two
    nodes of a cluster would; each launcher is started the same way a node's job script starts it."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = []
    for rank in (0, 1):
        node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29551",
                "--rdzv_id", "selftrain-test"]
        log = open(tmp_path / f"node{rank}.log", "w")
        launchers.append((subprocess.Popen(node + ["-m", "pipeline.cli"] + pipeline_args(config, run), stdout=log,
                                           stderr=subprocess.STDOUT, env=env), log))
    codes = []
    for process, log in launchers:
        codes.append(process.wait(timeout=900))
        log.close()
    output = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert codes == [0, 0], output[-3000:]
    assert_complete_two_process_run(config, run, output, tmp_path, nodes=2)


def two_nodes(tmp_path: Path, args_of_node, port: int) -> tuple[list[int], list[str]]:
    """Two torchrun launchers of one process each (nodes of a cluster), each node with its own arguments."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = []
    for rank in (0, 1):
        node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                "--rdzv_id", f"selftrain-{port}"]
        log = open(tmp_path / f"node{rank}-{port}.log", "w")
        launchers.append((subprocess.Popen(node + ["-m", "pipeline.cli"] + args_of_node(rank), stdout=log,
                                           stderr=subprocess.STDOUT, env=env), log))
    codes = []
    for process, log in launchers:
        codes.append(process.wait(timeout=300))
        log.close()
    return codes, [(tmp_path / f"node{rank}-{port}.log").read_text() for rank in (0, 1)]


def stopped_with_our_status(log: str) -> bool:
    """The node's process stopped with selftrain's user-error status 2, as its launcher reports it; a launcher
    whose rendezvous store (held by the other node's launcher, which may end first) went away before it read its
    process's status reports only that, after our message."""
    return log.count("exitcode  : 2") == 1 or ("selftrain: error: " in log and "RendezvousConnectionError" in log)


@pytest.mark.parametrize("case, port", [("other settings", 29561), ("no config", 29563), ("own run dir", 29565)])
def test_nodes_that_disagree_all_stop_at_once_naming_the_cause(config, tmp_path, case, port):
    """A node whose config file is missing stopped alone and left the other waiting until the 30-minute timeout;
    nodes started with another learning rate trained on silently; a run directory of each node's own failed only
    after the teacher had trained."""
    run = tmp_path / "run"

    def args_of_node(rank: int) -> list[str]:
        args = pipeline_args(config, run)
        if rank == 1 and case == "other settings":
            args += ["--set", "teacher.train.lr=0.5"]
        if rank == 1 and case == "no config":
            args[1] = str(tmp_path / "missing.yaml")
        if rank == 1 and case == "own run dir":
            args[3] = str(tmp_path / "elsewhere")
        return args

    codes, (node0, node1) = two_nodes(tmp_path, args_of_node, port)
    both = node0[-3000:] + node1[-3000:]
    assert codes == [1, 1] and stopped_with_our_status(node0) and stopped_with_our_status(node1), both
    expected = {"other settings": "was started with other settings than process 0 (teacher.train.lr: 0.05 -> 0.5)",
                "no config": "missing.yaml", "own run dir": "is not the run directory process 0 holds"}[case]
    assert expected in node1 and "selftrain: error: process 1 (on " in node0 and expected in node0, both
    assert not [line for line in (node0 + node1).splitlines() if line.startswith('  File "') and "/pipeline/" in line]
    assert not (run / "teacher").exists()


def test_a_compare_whose_config_one_node_lacks_stops_both_nodes(tmp_path):
    """`selftrain compare` loads its config on every process before the first collective, as `run` does."""
    config = tmp_path / "compare.yaml"
    config.write_text("axes: {init: [random], self_training: [off], policy: [s1], labels_per_class: [4], "
                      "seeds: [0]}\n")

    def args_of_node(rank: int) -> list[str]:
        return ["compare", str(config if rank == 0 else tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]

    codes, (node0, node1) = two_nodes(tmp_path, args_of_node, 29567)
    both = node0[-3000:] + node1[-3000:]
    assert codes == [1, 1] and stopped_with_our_status(node0) and stopped_with_our_status(node1), both
    assert "missing.yaml" in node1 and "selftrain: error: process 1 (on " in node0 and "missing.yaml" in node0, both


def test_a_node_that_goes_silent_stops_the_other_within_the_peer_timeout(config, tmp_path):
    """A process frozen inside a training step (SIGSTOP: a node lost or hung, as NCCL sees a dead peer) left the
    other waiting in the step's all-reduce for the process group's timeout (6 h). The peer watch stops it."""
    import signal
    import time

    run = tmp_path / "run"
    args = pipeline_args(config, run) + ["--set", "runtime.peer_timeout_s=10"]
    launchers, started = [], time.monotonic()
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if rank == 1:
            env.update(SELFTRAIN_KILL_AT_STEP="5", SELFTRAIN_KILL_SIGNAL="SIGSTOP")
        node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29569", "--rdzv_id", "selftrain-29569"]
        log = open(tmp_path / f"node{rank}.log", "w")
        launchers.append((subprocess.Popen(node + ["-m", "pipeline.cli"] + args, stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True), log))
    try:
        code = launchers[0][0].wait(timeout=240)
    finally:
        for process, log in launchers:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the launchers
            except ProcessLookupError:
                pass
            process.wait()
            log.close()
        kill_processes_naming(run)  # the frozen worker: torchrun starts it outside its launcher's process group
    node0 = (tmp_path / "node0.log").read_text()
    assert code == 1 and "exitcode  : 2" in node0, node0[-3000:]
    # the c10d rendezvous numbers the nodes as they arrive: the frozen one is process 0 or 1
    assert re.search(r"selftrain: error: process [01] \(on .+\) has given no sign of life for 1\d s", node0), node0[-3000:]
    assert time.monotonic() - started < 200  # seconds, not the 6 h of dist_timeout_minutes


def kill_processes_naming(path: Path) -> None:
    """SIGKILL every process whose command line names `path` (a frozen worker would stay, stopped, holding memory)."""
    import signal

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(path) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
