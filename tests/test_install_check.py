"""`make install` (run by `make demo` / `make test`) refuses a disk too small for the venv up front."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def install_asking_for_a_huge_disk(venv: Path) -> subprocess.CompletedProcess:
    """`make install` into `venv` with a free-space demand no disk meets."""
    return subprocess.run(
        ["make", "-C", str(REPO), "install", f"VENV={venv}", "MIN_FREE_GB=1000000"],
        capture_output=True, text=True, timeout=120,
    )


@needs_make
def test_install_refuses_a_disk_without_room_for_the_venv_and_makes_nothing(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = install_asking_for_a_huge_disk(venv)
    assert done.returncode != 0
    assert f"GB free on the disk holding {tmp_path}" in done.stderr
    assert "needs about 1e+06 GB" in done.stderr
    assert not venv.exists()


@needs_make
def test_install_checks_the_nearest_existing_folder_when_the_venv_parent_is_not_made_yet(tmp_path: Path) -> None:
    done = install_asking_for_a_huge_disk(tmp_path / "not" / "made" / "venv")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert f"GB free on the disk holding {tmp_path}," in done.stderr
    assert not (tmp_path / "not").exists()
