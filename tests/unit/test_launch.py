"""largebatch.launch: which stop each launcher understands, where the run's status is, and
the exit status it reports, on real child processes (the training runs are in
tests/e2e/test_faults.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from largebatch.launch import launcher_kind, log_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "cmd, kind",
    [
        (["mpirun", "-np", "2", "python", "t.py"], "usr1"),
        (["/opt/openmpi/bin/mpiexec", "python", "t.py"], "usr1"),
        (["srun", "--mpi=pmix", "python", "t.py"], "usr1"),
        (["torchrun", "--nproc_per_node", "2", "t.py"], "term"),
        (["/venv/bin/python3", "-m", "torch.distributed.run", "t.py"], "term"),
        (["horovodrun", "-np", "2", "python", "t.py"], "tree"),
        (["python", "t.py"], "tree"),
    ],
)
def test_launcher_kind(cmd, kind):
    assert launcher_kind(cmd) == kind


def test_log_dir_from_the_arguments():
    assert log_dir(["mpirun", "python", "t.py", "--log-dir", "runs/a"]) == Path("runs/a")
    assert log_dir(["mpirun", "python", "t.py", "--log-dir=runs/b"]) == Path("runs/b")
    assert log_dir(["mpirun", "python", "t.py"]) == Path("./logs")  # the job's default


# A stand-in for a run: catches SIGUSR1 like the ranks do, writes status.json, exits 7
# (torchrun's non-zero exit after a forwarded signal) or as told.
FAKE = """
import json, signal, sys, time
from pathlib import Path
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
print("ready", flush=True)
while not stop:
    time.sleep(0.05)
Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
if sys.argv[3] != "-":
    (Path(sys.argv[2]) / "status.json").write_text(json.dumps({"state": sys.argv[3]}))
sys.exit(int(sys.argv[4]))
"""


def wrapped(tmp_path, state: str, code: int, sig=signal.SIGTERM) -> int:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "largebatch.launch",
            sys.executable,
            script,
            "--log-dir",
            tmp_path / "run",
            state,
            str(code),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )  # largebatch comes from the install
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def test_stopped_run_exits_0_whatever_the_launcher_says(tmp_path):
    assert wrapped(tmp_path, "stopped", 7) == 0


def test_failed_or_silent_run_keeps_the_launchers_status(tmp_path):
    assert wrapped(tmp_path, "failed", 7) == 7
    assert wrapped(tmp_path / "b", "-", 5, sig=signal.SIGINT) == 5  # no status.json at all


def test_status_left_by_an_earlier_job_does_not_count(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "stopped"}))
    old = time.time() - 3600
    os.utime(run / "status.json", (old, old))
    assert wrapped(tmp_path, "-", 9) == 9
