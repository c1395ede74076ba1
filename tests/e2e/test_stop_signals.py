"""A scheduler's warning can arrive while the job is still starting (importing torch takes
seconds). The handlers must already be in place then, or SIGUSR1's default action kills
the process; the request is then honoured at the first report."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from helpers import MODEL, PYTHON, ROOT, TRAIN, env

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
    "2",
    "--warmup-epochs",
    "0",
    "--print-freq",
    "1",
    "--workers",
    "0",
]


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for sig (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_stop_signal_during_start_up_stops_at_the_first_report(tmp_path, engine):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [PYTHON, TRAIN, *SMOKE, "--log-dir", str(run_dir), "--engine", engine],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None and time.monotonic() < deadline, "the job never installed its handler"
        time.sleep(0.005)
    torch_loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert not torch_loaded, "the stop handlers were installed only after torch had loaded"
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGUSR1 at epoch 1 step 1;" in out, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("stopped", 1)
