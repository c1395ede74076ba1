"""Faults that used to lose work (issue 13), each injected into a real 2-process run: what
must survive is checked on the files the run leaves (a resume that ends with an
uninterrupted run's weights, checkpoints that still load), with the exit status and the one
line the user reads. docs/runs.md, "What a run leaves behind", says what each guarantees."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_bad_input import assert_usage_error
from torchvision import datasets

from helpers import (
    MODEL,
    MPIRUN,
    PYTHON,
    ROOT,
    STRAIGHT,
    TRAIN,
    env,
    job_args,
    latest_checkpoint,
    mpi_command,
    run_and_signal,
    run_in_process,
    run_job,
    signal_ranks,
)
from largebatch import checkpoint
from largebatch.data.sampler import TrainShard
from largebatch.files import host, temp_path

pytestmark = pytest.mark.mpi

# Two epochs of 10 steps, a checkpoint every 5 steps, the last two kept (helpers.STRAIGHT,
# the flags of the shared straight run): the run directory ends with
# checkpoint-1-step15.pth.tar (older) and checkpoint-2.pth.tar (newest).
RUN = list(STRAIGHT)
OLDER, NEWEST = "checkpoint-1-step15.pth.tar", "checkpoint-2.pth.tar"
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAUNCH = [PYTHON, "-m", "largebatch.launch"]


# --- running jobs in the background ------------------------------------------------------------


class Job:
    """A job started in the background whose merged output is read as it comes."""

    def __init__(self, cmd: list, marker: str):
        self.marker = marker  # in the command line of its ranks: how the test finds them
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT
        )
        self.lines: list[str] = []
        self.done = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.done = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                if self.done or time.monotonic() > deadline:
                    raise AssertionError(f"{text!r} never appeared:\n{''.join(self.lines)[-4000:]}")
                self._changed.wait(timeout=1)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code

    def stop(self) -> None:
        """Teardown after a failed test: end the launcher and its ranks."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        signal_ranks(self.marker, signal.SIGKILL)


@pytest.fixture
def background():
    jobs: list[Job] = []

    def start(cmd: list, marker: Path) -> Job:
        jobs.append(Job(cmd, str(marker)))
        return jobs[-1]

    yield start
    for job in jobs:
        job.stop()


def rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the rank processes (not the launcher) whose command line holds marker,
    their rank read from the environment the launcher gave them."""
    found = {}
    for pid in map(int, subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()):
        try:
            environ = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except OSError:
            continue
        rank = environ.get("OMPI_COMM_WORLD_RANK", environ.get("RANK"))  # launchers set it for ranks only
        if rank is not None:
            found[int(rank)] = pid
    return found


# --- what the tests compare ---------------------------------------------------------------------


@pytest.fixture
def straight(straight_runs) -> Path:
    """The uninterrupted run every resumed one must end like: RUN under mpirun, which picks
    Horovod (conftest.py's straight_runs, shared with other modules; tests copy it)."""
    run_dir = straight_runs("horovod").run_dir
    assert json.loads((run_dir / checkpoint.MANIFEST).read_text())["files"] == [OLDER, NEWEST]
    return run_dir


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    a, b = latest_checkpoint(reference), latest_checkpoint(run_dir)
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs from the uninterrupted run's"
    for pid, buf in a["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


def copy_run(source: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return run_dir


def corrupt_middle(path: Path, nbytes: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - nbytes // 2 : middle + nbytes // 2] = os.urandom(nbytes)
    path.write_bytes(bytes(data))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- damaged checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_damaged_newest_checkpoint_resumes_from_the_older_one(straight, digits, tmp_path, damage):
    """4 KiB of random bytes in the middle of the newest checkpoint (torch.load would accept
    them), or the newest cut in half: --resume auto warns once, naming it, resumes from the
    older one, and ends with the uninterrupted run's weights, bit for bit. The older one
    stays listed and unchanged (the damaged file never counted against --keep-checkpoints)."""
    run_dir = copy_run(straight, tmp_path)
    newest, older = run_dir / NEWEST, run_dir / OLDER
    older_bytes = older.read_bytes()
    if damage == "corrupted":
        corrupt_middle(newest)
    else:
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        # Named explicitly, a damaged checkpoint is refused, not skipped: one line, exit 2
        # (rank 0 reads it; one process, in this one).
        proc = run_in_process(job_args(digits, run_dir, *RUN, "--resume", newest))
        assert_usage_error(proc, str(newest), "truncated or damaged")
        assert len(error_lines(proc.stderr)) == 1, proc.stderr

    proc = run_job(job_args(digits, run_dir, *RUN))
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "trying an older checkpoint" in warnings[0], (
        proc.stderr
    )
    assert f"resuming from {older} (epoch 1, step 15)" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert_same_weights(run_dir, straight)
    assert json.loads((run_dir / checkpoint.MANIFEST).read_text())["files"] == [OLDER, NEWEST]
    assert older.read_bytes() == older_bytes
    assert checkpoint.load(newest)["step"] == 20  # rewritten, and verified against the manifest


# --- two runs, one directory; a killed run ----------------------------------------------------------


def test_second_run_into_the_same_directory_is_refused(digits, tmp_path, background):
    run_dir = tmp_path / "run"
    # Far more epochs than the test lets it run: the first run must still hold the lock when the
    # second starts, however slowly a loaded machine starts the second's ranks.
    args = job_args(digits, run_dir, "--epochs", "1000")
    first = background(mpi_command(2, TRAIN, args), run_dir)
    first.wait_for("epoch 1/1000 step 1/")  # training: the lock is held
    holder = json.loads((run_dir / ".lock").read_text())
    assert holder["pid"] in rank_pids(str(run_dir)).values()

    second = run_in_process(args)  # a second run, one process in this one: the lock is the first run's rank 0's
    assert_usage_error(
        second,
        f"--log-dir {run_dir} is in use by a run on host {socket.gethostname()}, "
        f"pid {holder['pid']}, started {holder['started']}",
    )
    assert len(error_lines(second.stderr)) == 1, second.stderr
    assert not first.done, "the first run ended before the second was refused: the test proved nothing"
    assert signal_ranks(str(run_dir), signal.SIGTERM) == 2
    assert first.finish() == 0, first.output
    assert status(run_dir)["state"] == "stopped"  # the first run's own stop, untouched by the second


def test_run_killed_with_sigkill_leaves_no_lock_behind(digits, tmp_path, background):
    """kill -9 of every rank: the kernel drops the lock with the process; the next run resumes."""
    run_dir = tmp_path / "run"
    args = job_args(digits, run_dir, "--epochs", "2", "--seed", "7")
    job = background(mpi_command(2, TRAIN, args), run_dir)
    job.wait_for("epoch 2/2 step 1/")  # past the epoch-1 checkpoint
    assert signal_ranks(str(run_dir), signal.SIGKILL) == 2
    assert job.finish() != 0
    assert status(run_dir)["state"] == "running"  # nobody said otherwise: the ranks died

    proc = run_job(args)
    assert f"resuming from {run_dir / 'checkpoint-1.pth.tar'} (epoch 1, step 10)" in proc.stdout
    assert "in use" not in proc.stderr
    assert status(run_dir)["state"] == "finished"


def test_stale_temp_file_of_a_dead_writer_is_removed_at_start(straight, digits, tmp_path):
    """A writer killed mid-write leaves `.NAME.tmp-HOST-PID`; the next run removes it, saying
    so, and leaves those of live writers and of other hosts (whose pids it cannot check)."""
    run_dir = copy_run(straight, tmp_path)
    name = temp_path(run_dir / "checkpoint-3.pth.tar").name  # as files.atomic_write names it
    stale = run_dir / re.sub(r"-\d+$", f"-{dead_pid()}", name)
    stale.write_bytes((run_dir / NEWEST).read_bytes()[:1_000_000])
    live = run_dir / re.sub(r"-\d+$", f"-{os.getpid()}", name)
    elsewhere = run_dir / f".checkpoint-3.pth.tar.tmp-not-{host()}-{dead_pid()}"
    for path in (live, elsewhere):
        path.write_bytes(b"partial")

    proc = run_job(job_args(digits, run_dir, *RUN))
    assert proc.stdout.count(f"removed {stale.name}, left by a killed writer") == 1, proc.stdout
    assert not stale.exists() and live.exists() and elsewhere.exists()
    assert "already finished" in proc.stdout


# --- full disk -----------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A real tmpfs, so that ENOSPC comes from the kernel; resized with remount."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
            f"tests/unit/test_checkpoint.py covers the write errors with a file size limit"
        )

    def resize(nbytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={nbytes // 1024}k", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(straight, digits, small_fs):
    mount, resize = small_fs
    size = (straight / NEWEST).stat().st_size  # every checkpoint of this model is this big
    resize(size * 3 // 2)  # the first checkpoint fits, a second does not
    run_dir = mount / "run"
    args = job_args(digits, run_dir, "--epochs", "2", "--seed", "7", "--keep-checkpoints", "2")
    proc = run_job(args, check=False)
    first, second = run_dir / "checkpoint-1.pth.tar", run_dir / "checkpoint-2.pth.tar"
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert re.search(
        rf"error: cannot write checkpoint {re.escape(str(second))}: no space left \(needs [\d.]+ MiB, "
        rf"[\d.]+ MiB free on {re.escape(str(run_dir))}\); the previous checkpoint "
        rf"{re.escape(str(first))} is intact; free space, or lower --keep-checkpoints$",
        lines[0],
    ), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not second.exists() and not list(run_dir.glob(".*tmp*")), "the failed write left a file behind"
    assert json.loads((run_dir / checkpoint.MANIFEST).read_text())["files"] == [first.name]
    assert checkpoint.load(first)["epoch"] == 1

    # With --keep-checkpoints 1 a run needs room for two: the old one and the one replacing it.
    resize(size * 5 // 2)
    proc = run_job([*args, "--keep-checkpoints", "1"])
    assert f"resuming from {first}" in proc.stdout
    assert status(run_dir)["state"] == "finished" and status(run_dir)["epoch"] == 2
    assert json.loads((run_dir / checkpoint.MANIFEST).read_text())["files"] == ["checkpoint-2.pth.tar"]


# --- divergence ----------------------------------------------------------------------------------


def poisoned(state: dict, factor: float) -> dict:
    """The checkpoint with its learning rate (the schedule's base rates and the optimizer's
    current ones) multiplied by ``factor``."""
    sched = state["scheduler"]
    sched["base_lrs"] = [lr * factor for lr in sched["base_lrs"]]
    sched["_last_lr"] = [lr * factor for lr in sched["_last_lr"]]
    for group in state["optimizer"]["param_groups"]:
        group["lr"], group["initial_lr"] = group["lr"] * factor, group["initial_lr"] * factor
    return state


def test_divergence_stops_with_exit_3_and_keeps_the_finite_checkpoints(digits, tmp_path):
    """A first job trains epoch 1 and stops. The second resumes into a learning rate 1e20
    times larger and diverges: one line, exit 3, status failed, and the checkpoints from
    before are all still listed and load, with finite weights. (The rate is raised in a copy
    of the checkpoint, outside the run directory: a resumed run takes its schedule from the
    checkpoint, so a changed --base-lr would not reach it.)"""
    run_dir = tmp_path / "run"
    args = job_args(digits, run_dir, "--epochs", "2", "--base-op", "sgd", "--seed", "7")
    run_and_signal(args, when="epoch 1/2: val", marker=str(run_dir))
    before = json.loads((run_dir / checkpoint.MANIFEST).read_text())["files"]
    assert before and before[0] == "checkpoint-1.pth.tar"
    blown_up = tmp_path / "blown-up.pth.tar"
    torch.save(poisoned(checkpoint.load(run_dir / before[-1]), 1e20), blown_up)

    proc = run_job([*args, "--resume", blown_up], check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "the loss was not finite" in line]
    assert len(lines) == 1 and "the run diverged" in lines[0], proc.stdout[-3000:]
    assert "not finite in 1 optimizer step(s)" in lines[0], lines[0]  # one step, on both ranks: once
    assert "Traceback" not in proc.stderr + proc.stdout
    assert status(run_dir)["state"] == "failed"
    assert json.loads((run_dir / checkpoint.MANIFEST).read_text())["files"] == before
    for name in before:
        state = checkpoint.load(run_dir / name)
        assert checkpoint.all_finite(state), f"{name} holds non-finite weights"


def test_after_a_divergence_the_run_resumes_from_its_newest_finite_checkpoint(digits, tmp_path):
    """Weights with a NaN, tolerated for one step (--max-nonfinite-steps 1) and checkpointed
    every step: the non-finite checkpoint is listed, status.json names the finite one from
    before, and --resume auto goes back to that one (one warning for the other) instead of
    into the same divergence."""
    run_dir = tmp_path / "run"
    args = job_args(digits, run_dir, "--epochs", "2", "--base-op", "sgd", "--seed", "7")
    run_and_signal(args, when="epoch 1/2: val", marker=str(run_dir))
    finite = run_dir / "checkpoint-1.pth.tar"
    poisoned_copy = tmp_path / "nan.pth.tar"
    state = checkpoint.load(finite)
    next(iter(state["model"].values())).view(-1)[0] = float("nan")
    torch.save(state, poisoned_copy)

    proc = run_job(
        [*args, "--resume", poisoned_copy, "--max-nonfinite-steps", "1", "--checkpoint-every", "1"], check=False
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the loss was not finite in 2 optimizer step(s) up to step 12" in proc.stdout, proc.stdout[-2000:]
    entries = json.loads((run_dir / checkpoint.MANIFEST).read_text())["entries"]
    assert entries["checkpoint-1-step11.pth.tar"]["finite"] is False
    assert status(run_dir)["state"] == "failed" and status(run_dir)["checkpoint"] == str(finite)

    proc = run_job(args)
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert warnings == [
        f"warning: {run_dir / 'checkpoint-1-step11.pth.tar'} holds non-finite weights; trying an older checkpoint"
    ], proc.stderr
    assert f"resuming from {finite} (epoch 1, step 10)" in proc.stdout
    assert status(run_dir)["state"] == "finished"
    assert checkpoint.all_finite(checkpoint.load(run_dir / "checkpoint-2.pth.tar"))


# --- input the model cannot use ------------------------------------------------------------------


def test_class_without_a_readable_image_is_refused(digits, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    for path in (data / "train" / "3").iterdir():
        path.write_bytes(b"not an image")
    proc = run_in_process(job_args(data, tmp_path / "run", "--epochs", "1"))  # both ranks' stop: test_bad_input
    assert_usage_error(proc, f"--train-dir {data / 'train'}: class '3' has no readable image", "fix or remove")
    assert len(error_lines(proc.stderr)) == 1, proc.stderr


def test_batch_of_one_image_is_refused_with_batch_norm(digits, tmp_path):
    proc = run_in_process(job_args(digits, tmp_path / "run", "--epochs", "1", "--batch-size", "1"))
    assert_usage_error(proc, f"--batch-size 1 cannot train {MODEL}", "--batch-size 2 or more")


def test_unreadable_and_shrunk_batches_keep_the_ranks_in_step(digits, tmp_path, engine):
    """Rank 0's first micro-batch all unreadable, its second shrunk to one image (batch norm
    cannot train on one: at 16 pixels, a traceback). Both run as empty batches, with one
    warning for the shrunk one, and every engine's reduction stays in step to the end (DDP
    reduces only after a forward pass through it: a rank that skipped it hung the others)."""
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    samples = datasets.ImageFolder(str(data / "train")).samples
    batches = TrainShard(len(samples), rank=0, size=2, seed=7, epoch=0).indices
    for index in [*batches[:16], *batches[17:32]]:
        Path(samples[index][0]).write_bytes(b"not an image")

    run_dir = tmp_path / "run"
    proc = run_job(job_args(data, run_dir, "--epochs", "1", "--seed", "7", "--engine", engine), timeout=300)
    warnings = [line for line in proc.stderr.splitlines() if "skipping a micro-batch" in line]
    assert len(warnings) == 1 and "left with 1 readable image(s)" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert status(run_dir)["state"] == "finished"
    assert checkpoint.all_finite(checkpoint.load(run_dir / "checkpoint-1.pth.tar"))


# --- a rank that dies ----------------------------------------------------------------------------


def test_survivor_of_a_killed_rank_says_so_in_one_line(digits, tmp_path, background):
    """torch engine (Gloo): kill -9 of rank 1; rank 0's collective fails. It says so in one
    line instead of a traceback (torchrun adds its own report of the dead worker)."""
    run_dir = tmp_path / "run"
    job = background([*TORCHRUN, TRAIN, *job_args(digits, run_dir, "--epochs", "2")], run_dir)
    job.wait_for("epoch 1/2 step 2/")
    os.kill(rank_pids(str(run_dir))[1], signal.SIGKILL)
    assert job.finish() != 0
    lines = [line for line in job.output.splitlines() if "lost its connection" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "pytorch_imagenet_resnet.py: error: rank 0 lost its connection to another process ("
    ), job.output[-4000:]
    assert "[rank0]" not in job.output and "RuntimeError" not in job.output, job.output[-4000:]


# --- SIGTERM to the launcher ---------------------------------------------------------------------

LAUNCHERS = {
    "mpirun": [MPIRUN, "-np", "2", "--oversubscribe", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED", PYTHON],
    "torchrun": TORCHRUN,
    "horovodrun": [str(ROOT / ".venv" / "bin" / "horovodrun"), "-np", "2", PYTHON],
}


def stop_by_sigterm(job: Job, target: int, when: str) -> float:
    """SIGTERM to ``target`` once ``when`` appears; the seconds from the signal to the exit."""
    job.wait_for(when)
    sent = time.monotonic()
    os.kill(target, signal.SIGTERM)
    job.proc.wait(timeout=300)
    return time.monotonic() - sent


@pytest.mark.parametrize("launcher", ["mpirun", "torchrun", "horovodrun"])
def test_sigterm_to_the_wrapped_launcher_checkpoints(launcher, straight, digits, tmp_path, background):
    """python -m largebatch.launch LAUNCHER ...: SIGTERM to it stops the ranks with a
    checkpoint, and it exits 0. Under mpirun the run then resumes to the uninterrupted run's
    weights (the other launchers run other engines or paths that sum in another order)."""
    run_dir = tmp_path / "run"
    args = job_args(digits, run_dir, *RUN)
    job = background([*LAUNCH, *LAUNCHERS[launcher], TRAIN, *args], run_dir)
    elapsed = stop_by_sigterm(job, job.proc.pid, when="epoch 1/2 step 3/")
    print(f"{launcher} under largebatch.launch: SIGTERM to exit in {elapsed:.1f} s")
    assert job.finish() == 0, job.output[-4000:]
    assert (status(run_dir)["state"], status(run_dir)["epoch"]) == ("stopped", 0), job.output[-3000:]
    assert "checkpoint written" in job.output
    if launcher == "mpirun":
        run_job(args)
        assert_same_weights(run_dir, straight)


def wait_until(check, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_ranks_of_a_torchrun_killed_by_sigusr1_checkpoint_and_stop(digits, tmp_path, background):
    """SIGUSR1 kills a bare torchrun at once (its default action). Its ranks see their
    launcher gone, checkpoint at the next report and stop, instead of training on to the end."""
    run_dir = tmp_path / "run"
    job = background([*TORCHRUN, TRAIN, *job_args(digits, run_dir, "--epochs", "1000")], run_dir)
    job.wait_for("epoch 1/1000 step 2/")
    ranks = rank_pids(str(run_dir))
    assert len(ranks) == 2
    os.kill(job.proc.pid, signal.SIGUSR1)
    assert job.finish() == -signal.SIGUSR1
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in ranks.values()), what="the ranks to stop")
    assert status(run_dir)["state"] == "stopped" and status(run_dir)["epoch"] < 1000
    assert checkpoint.load(Path(status(run_dir)["checkpoint"]))["step"] == status(run_dir)["step"]


def test_sigint_to_torchrun_checkpoints(digits, tmp_path, background):
    """torchrun passes SIGINT on to its workers; a first SIGINT is a stop with a checkpoint."""
    run_dir = tmp_path / "run"
    job = background([*TORCHRUN, TRAIN, *job_args(digits, run_dir, *RUN)], run_dir)
    job.wait_for("epoch 1/2 step 3/")
    os.kill(job.proc.pid, signal.SIGINT)
    job.finish()
    assert status(run_dir)["state"] == "stopped", job.output[-3000:]
    assert "stopped by SIGINT" in job.output and "KeyboardInterrupt" not in job.output


def test_the_wrapper_returns_the_jobs_own_status_under_torchrun(digits, tmp_path):
    """Bad input exits 2 on every rank; torchrun makes that 1 (and prints a traceback of its
    own); python -m largebatch.launch torchrun ... returns the 2."""
    proc = subprocess.run(
        [*LAUNCH, *TORCHRUN, TRAIN, *job_args(digits, tmp_path / "run", "--crop-ratio", "1,inf")],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--crop-ratio" in proc.stderr


def test_sigint_to_one_horovod_rank_stops_them_all_with_a_checkpoint(digits, tmp_path, background):
    run_dir = tmp_path / "run"
    job = background(mpi_command(2, TRAIN, job_args(digits, run_dir, *RUN, "--engine", "horovod")), run_dir)
    job.wait_for("epoch 1/2 step 3/")
    os.kill(rank_pids(str(run_dir))[1], signal.SIGINT)
    assert job.finish() == 0, job.output[-3000:]
    assert status(run_dir)["state"] == "stopped"
    assert "Traceback" not in job.output and "HorovodInternalError" not in job.output, job.output[-3000:]


def test_torchrun_forwards_sigterm_to_its_workers(digits, tmp_path, background):
    """torchrun on its own: SIGTERM reaches the workers, which checkpoint; torchrun itself
    exits 1 (with a traceback of its own), which is why the wrapper reads status.json."""
    run_dir = tmp_path / "run"
    job = background([*TORCHRUN, TRAIN, *job_args(digits, run_dir, *RUN)], run_dir)
    elapsed = stop_by_sigterm(job, job.proc.pid, when="epoch 1/2 step 3/")
    print(f"torchrun: SIGTERM to exit in {elapsed:.1f} s, exit status {job.proc.returncode}")
    job.finish()
    assert status(run_dir)["state"] == "stopped", job.output[-3000:]
    assert "stopped by SIGTERM" in job.output
    assert checkpoint.load(Path(status(run_dir)["checkpoint"]))["step"] == status(run_dir)["step"]
