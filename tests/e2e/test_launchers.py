"""The job starts under each launcher users name: plain python, mpirun, horovodrun (MPI
and Gloo controllers)."""

import subprocess

import pytest

from helpers import MODEL, PYTHON, ROOT, TRAIN, env

# Every test starts the job with horovodrun.
pytestmark = pytest.mark.mpi

SMOKE = [
    "--synthetic",
    "--synthetic-size",
    "64",
    "--model",
    MODEL,
    "--image-size",
    "16",
    "--val-resize",
    "16",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--warmup-epochs",
    "0",
    "--print-freq",
    "1",
]


@pytest.mark.parametrize("controller", ["--mpi", "--gloo"])
def test_horovodrun(controller, tmp_path):
    horovodrun = str(ROOT / ".venv" / "bin" / "horovodrun")
    cmd = [horovodrun, "-np", "2", controller, PYTHON, TRAIN, *SMOKE, "--log-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "finished" in proc.stdout
