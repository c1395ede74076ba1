"""Launching real training jobs from tests: plain python or `mpirun -np N`, real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MPIRUN = str(Path(sys.executable).with_name("mpirun"))
TRAIN = str(ROOT / "pytorch_imagenet_resnet.py")
TRAIN_DALI = str(ROOT / "pytorch_imagenet_resnet_dali.py")

# The model of the end-to-end tests that are about the job, not the model: a torchvision
# classifier with batch norm, biases and an `fc` layer, like a ResNet, with 0.35M parameters
# instead of resnet18's 11M. At 16 pixels a step is 4x faster and a checkpoint 30x smaller,
# which took a third off the suite. Tests about ResNets name resnet18 themselves.
MODEL = "shufflenet_v2_x0_5"

# Small, fast settings shared by the end-to-end tests: 16-pixel digits, MODEL, LARS with
# normalisation weights and biases excluded and no label smoothing (the defaults these tests
# were written against, spelled out since the original trainer's defaults came back).
FAST = [
    "--model",
    MODEL,
    "--base-op",
    "lars",
    "--bn-bias-separately",
    "--label-smoothing",
    "0",
    "--image-size",
    "16",
    "--val-resize",
    "16",
    "--crop-scale",
    "0.6,1",
    "--batch-size",
    "16",
    "--val-batch-size",
    "32",
    "--workers",
    "0",
    "--print-freq",
    "1",
    "--warmup-epochs",
    "0.5",
    "--base-lr",
    "1",
    "--wd",
    "1e-4",
]

# The flags of the shared uninterrupted runs (tests/e2e/conftest.py, straight_runs): two
# epochs of 10 steps on the digits, seed 7, a checkpoint every 5 steps, the last two kept.
# The run directory ends with checkpoint-1-step15.pth.tar and checkpoint-2.pth.tar.
STRAIGHT = ("--epochs", "2", "--seed", "7", "--checkpoint-every", "5", "--keep-checkpoints", "2")


def job_args(data: Path, run_dir: Path, *extra) -> list:
    """The job's flags for the ImageFolder tree ``data`` (train/, val/), run directory ``run_dir``."""
    return ["--train-dir", data / "train", "--val-dir", data / "val", "--log-dir", run_dir, *FAST, *extra]


def env() -> dict:
    e = dict(os.environ)
    # No PYTHONPATH: the jobs find largebatch through the editable install (tools/setup.sh),
    # as a user's jobs do.
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return e


def mpi_command(np: int, script: str, args: list[str]) -> list[str]:
    return [
        MPIRUN,
        "-np",
        str(np),
        "--oversubscribe",
        "-x",
        "OMP_NUM_THREADS",
        "-x",
        "PYTHONUNBUFFERED",
        PYTHON,
        script,
        *map(str, args),
    ]


def run_job(
    args: list,
    np: int = 2,
    script: str = TRAIN,
    timeout: float = 600,
    check: bool = True,
    extra_env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run the training job; np=1 runs plain python, np>1 runs mpirun -np."""
    cmd = [PYTHON, script, *map(str, args)] if np == 1 else mpi_command(np, script, args)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**env(), **(extra_env or {})}, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"job failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def run_in_process(args: list, entry: str = "folder", engine: str = "torch") -> subprocess.CompletedProcess:
    """``python pytorch_imagenet_resnet.py ARGS`` on one process, in this one: the entry
    scripts' own ``largebatch.cli.main``, its exit status and what it prints, without the
    seconds a new process spends importing torch. For what one process shows (refusals, a
    finished run); tests that need the script as a process, or several ranks, use run_job.

    ``--engine engine`` is added unless ``args`` name one: the torch engine's one-process
    Gloo group, where the default (auto) would start Horovod's MPI inside pytest.
    Afterwards, what the process's exit would undo: the stop-signal handlers main installs,
    the run-directory locks it holds, the process group."""
    import contextlib
    import io
    import signal

    import torch.distributed as dist

    from largebatch import cli, runlock

    out, err = io.StringIO(), io.StringIO()
    argv = [*map(str, args), "--engine", engine] if "--engine" not in map(str, args) else list(map(str, args))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(entry, argv)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for lock in list(runlock._HELD.values()):
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_mpi_script(
    script: Path, args: list = (), np: int = 2, timeout: float = 300, engine: str = "horovod", check: bool = True
) -> subprocess.CompletedProcess:
    """Run a helper script of the tests under mpirun on ``engine``; fails the test on a
    non-zero exit (unless not ``check``). The script reports what it checked as JSON lines
    (``results``)."""
    return run_job(
        list(args),
        np=np,
        script=str(script),
        timeout=timeout,
        check=check,
        extra_env={"LARGEBATCH_TEST_ENGINE": engine},
    )


def results(stdout: str) -> list[dict]:
    """What a helper script under tests/e2e/scripts reported: its JSON lines, in order."""
    import json

    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def signal_ranks(marker: str, sig: int) -> int:
    """Signal the rank processes (python, not the launcher) whose command line has marker."""
    pids = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    sent = 0
    for pid in map(int, pids):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if cmdline and "python" in Path(cmdline[0].decode()).name:
            os.kill(pid, sig)
            sent += 1
    return sent


def run_and_signal(
    args: list, when: str, marker: str, np: int = 2, script: str = TRAIN, sig: int = signal.SIGUSR1
) -> str:
    """Run the job under mpirun; when a line of its output contains ``when``, send ``sig``
    to every rank whose command line contains ``marker``. Returns the output; the job
    must exit 0 (a signalled job checkpoints and leaves cleanly)."""
    proc = subprocess.Popen(
        mpi_command(np, script, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT
    )
    output, sent = [], 0
    for line in proc.stdout:
        output.append(line)
        if when in line and not sent:
            sent = signal_ranks(marker, sig)
    text = "".join(output)
    assert proc.wait(timeout=300) == 0, text
    assert sent == np, f"signalled {sent} of {np} ranks\n{text}"
    return text


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: Path) -> dict:
    import json

    files = json.loads((run_dir / "checkpoints.json").read_text())["files"]
    return load_checkpoint(run_dir / files[-1])
