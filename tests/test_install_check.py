"""`make install` (run by `make demo` / `make test`) refuses a disk too small for the venv up front."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_install_refuses_a_disk_without_room_for_the_venv_and_makes_nothing(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", "-C", str(REPO), "install", f"VENV={venv}", "MIN_FREE_GB=1000000"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert f"GB free on the disk holding {tmp_path}" in done.stderr
    assert "needs about 1e+06 GB" in done.stderr
    assert not venv.exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_install_checks_the_nearest_existing_folder_when_the_venv_parent_is_not_made_yet(tmp_path: Path) -> None:
    venv = tmp_path / "not" / "made" / "venv"
    done = subprocess.run(
        ["make", "-C", str(REPO), "install", f"VENV={venv}", "MIN_FREE_GB=1000000"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert f"GB free on the disk holding {tmp_path}," in done.stderr
    assert not (tmp_path / "not").exists()
