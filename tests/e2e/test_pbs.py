"""Rendered PBS Pro scripts, run the way PBS runs them: bash executes the script with the
environment a PBS MOM provides (PBS_NODEFILE, PBS_JOBID, PBS_O_WORKDIR, ...), and the
script starts the 2-rank training job with mpirun. No PBS server is packaged for these
machines, so qsub's own part (queueing, the afterany dependency) is checked as the command
`submit --dry-run` prints; everything inside the job runs for real.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from jobrun import check_continued_run, jobs_cli, resumed_at, status, steps_per_epoch, train_args, wait_for_text

from helpers import env

# The job scripts start their ranks with mpirun.
pytestmark = pytest.mark.mpi

EPOCHS = 3


def pbs_env(workdir: Path, job_id: str, ranks_per_node: int, nodes: int) -> dict:
    """What PBS Pro sets for a job on `nodes` nodes of `ranks_per_node` MPI ranks (mpiprocs):
    the node file names each node once per rank. Every 'node' here is this machine."""
    nodefile = workdir / f"nodefile-{job_id}"
    nodefile.write_text(f"{socket.gethostname()}\n" * (nodes * ranks_per_node))
    return {
        **env(),
        "PBS_ENVIRONMENT": "PBS_BATCH",
        "PBS_JOBID": job_id,
        "PBS_JOBNAME": "lb-test",
        "PBS_NODEFILE": str(nodefile),
        "PBS_O_WORKDIR": str(workdir),
        "PBS_O_HOST": socket.gethostname(),
        "PBS_QUEUE": "workq",
        "NCPUS": str(ranks_per_node),
        "OMP_NUM_THREADS": "1",
    }


def start_job(script: Path, workdir: Path, job_id: str, ranks_per_node: int = 2, nodes: int = 1):
    # PBS starts the script in the user's home directory, not where qsub ran.
    return subprocess.Popen(
        ["bash", str(script)],
        cwd=os.environ.get("HOME", "/"),
        text=True,
        env=pbs_env(workdir, job_id, ranks_per_node, nodes),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_stopped_job_is_continued_by_the_next_job_of_the_chain(digits, tmp_path):
    """Multi-node template (2 'nodes' of 1 rank): the first job of a --chain 3 is signalled
    as `qsig -s USR1` would, checkpoints and exits 0; the second continues and finishes; the
    third finds nothing to do."""
    out = jobs_cli(
        "submit",
        "--scheduler",
        "pbs",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--ranks-per-node",
        "1",
        "--time",
        "01:00:00",
        "--queue",
        "workq",
        "--chain",
        "3",
        "--dry-run",
        "--",
        *train_args(digits, "run", EPOCHS),
        cwd=tmp_path,
    ).stdout
    run_dir = tmp_path / "run"
    script = run_dir / "job.pbs"
    assert f"would run: qsub {script}" in out
    assert f"would run: qsub -W depend=afterany:JOB1 {script}" in out
    assert f"would run: qsub -W depend=afterany:JOB2 {script}" in out
    text = script.read_text()
    assert "#PBS -l select=2:ncpus=1:mpiprocs=1" in text and "#PBS -l place=scatter" in text
    assert "#PBS -q workq" in text and "##PBS -A <account>" in text and "CONTINUE=chain" in text

    first = start_job(script, tmp_path, "101.pbs", ranks_per_node=1, nodes=2)
    log = run_dir / "pbs-101.pbs.out"
    wait_for_text(log, f"epoch 2/{EPOCHS} step 2/", timeout=240, alive=lambda: first.poll() is None)
    first.send_signal(signal.SIGUSR1)  # the job script's shell, as qsig and the alarm do
    rc, out = finish(first)
    first_log = log.read_text()
    assert rc == 0, out + first_log[-4000:]
    assert f"the log of job 101.pbs is {log}" in out
    assert "stopped by SIGUSR1" in first_log and "the next job of the chain continues" in first_log
    assert status(run_dir)["state"] == "stopped"

    rc, out = finish(start_job(script, tmp_path, "102.pbs", ranks_per_node=1, nodes=2))
    second_log = (run_dir / "pbs-102.pbs.out").read_text()
    assert rc == 0, second_log[-4000:]
    (stop_step,) = resumed_at(second_log)
    check_continued_run(run_dir, EPOCHS, steps_per_epoch(digits), stop_step)

    rc, out = finish(start_job(script, tmp_path, "103.pbs", ranks_per_node=1, nodes=2))
    assert rc == 0 and "finished training; nothing to do" in (run_dir / "pbs-103.pbs.out").read_text()


def test_alarm_stops_the_run_before_the_walltime(digits, tmp_path):
    """PBS Pro sends no warning before the walltime, so the script sets its own alarm:
    --time 00:00:45 with --warning 20 asks for a checkpoint 25 s in, long before the 400
    epochs asked for could finish."""
    jobs_cli(
        "render",
        "--scheduler",
        "pbs",
        "--gpus-per-node",
        "0",
        "--ranks-per-node",
        "2",
        "--time",
        "00:00:45",
        "--warning",
        "20",
        "--",
        *train_args(digits, "run", 400),
        cwd=tmp_path,
    )
    run_dir = tmp_path / "run"
    assert "#PBS -l walltime=00:00:45" in (run_dir / "job.pbs").read_text()
    rc, out = finish(start_job(run_dir / "job.pbs", tmp_path, "201.pbs"), timeout=200)
    log = (run_dir / "pbs-201.pbs.out").read_text()
    assert rc == 0, out + log[-4000:]
    assert "SIGUSR1 received" in log and "stopped by SIGUSR1" in log, log[-4000:]
    state = status(run_dir)
    assert state["state"] == "stopped" and 0 < state["step"] < 400 * steps_per_epoch(digits), state
    assert "submit this script again to continue" in log
