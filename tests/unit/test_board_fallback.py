"""TensorBoard event files without tensorboardX (a bare GPU machine's PyTorch): PyTorch's own
writer where the tensorboard package is installed, else no event files and one note."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def run(code: str, tmp_path: Path, hide: tuple[str, ...]) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in which the modules ``hide`` do not import."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in hide)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )


WRITE = """
    from largebatch.logs import Board
    board = Board("run", enabled=True)
    print("source:", board.source)
    board.scalars(1, {"train/loss": 2.5})
    board.scalars(2, {"train/loss": 1.5})
    board.close()
    Board("run2", enabled=False)  # other ranks: silent
"""


def test_without_any_writer_the_run_goes_on_and_says_so_once(tmp_path):
    proc = run(WRITE, tmp_path, hide=("tensorboardX", "tensorboard", "torch.utils.tensorboard"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("no TensorBoard event files") == 1, proc.stdout
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_torch_writer_when_tensorboard_is_installed(tmp_path):
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError as e:
        pytest.skip(f"the tensorboard package does not import here ({e}); `make setup` installs it")
    proc = run(
        WRITE
        + """
    from largebatch.events import read_scalars
    print("read:", read_scalars("run")["train/loss"])
    """,
        tmp_path,
        hide=("tensorboardX",),
    )
    assert proc.returncode == 0, proc.stderr
    assert "source: torch.utils.tensorboard" in proc.stdout
    assert "read: [(1, 2.5), (2, 1.5)]" in proc.stdout
