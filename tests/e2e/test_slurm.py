"""Rendered SLURM scripts on a real one-node SLURM cluster started by these tests: a 2-rank
training job is submitted with sbatch, stopped by the warning signal, and continued, by
requeueing itself or by the next job of a chain, without losing or repeating an epoch.

Needs Debian's slurm packages and root (tools/install_slurm.sh); skips and says so without.
"""

from __future__ import annotations

import pytest
from jobrun import (
    check_continued_run,
    jobs_cli,
    resumed_at,
    status,
    steps_per_epoch,
    submitted_ids,
    train_args,
    wait_for_text,
)
from slurm_cluster import SlurmCluster, missing

from helpers import ROOT, env
from largebatch.events import read_scalars

# A real SLURM cluster; its jobs start their ranks with mpirun or srun.
pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

EPOCHS = 3
# Two ranks, no GPU: the test node has 2 CPUs and nothing else.
RESOURCES = [
    "--scheduler",
    "slurm",
    "--gpus-per-node",
    "0",
    "--ranks-per-node",
    "2",
    "--cpus-per-rank",
    "1",
    "--time",
    "00:10:00",
    "--warning",
    "60",
]


@pytest.fixture(scope="module")
def slurm():
    reason = missing()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster.start(env())
    yield cluster
    cluster.stop()


def _signal_after_first_epoch(slurm, job: str, log, epochs: int) -> None:
    """Wait until the job has checkpointed epoch 1 and trained on, then send the warning
    signal SLURM would send before the time limit (to the batch shell, as --signal=B: does)."""
    running = lambda: slurm.job(job).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING")  # noqa: E731
    wait_for_text(log, f"epoch 2/{epochs} step 1/", timeout=300, alive=running)
    slurm.run("scancel", "--batch", "--signal=USR1", job)


def test_warning_signal_checkpoints_then_the_job_requeues_itself_and_finishes(slurm, digits, tmp_path, engine):
    # resnet18: the one model that learns on 16-pixel digits this fast (the loss must fall)
    out = jobs_cli(
        "submit",
        *RESOURCES,
        "--engine",
        engine,
        "--",
        *train_args(digits, "run", EPOCHS),
        "--model",
        "resnet18",
        cwd=tmp_path,
        extra_env=slurm.env,
    ).stdout
    (job,) = submitted_ids(out)
    run_dir = tmp_path / "run"
    log = run_dir / f"slurm-{job}.out"  # one log: a requeued job appends (--open-mode=append)
    assert "#SBATCH --signal=B:USR1@60" in (run_dir / "job.sbatch").read_text()

    _signal_after_first_epoch(slurm, job, log, EPOCHS)
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=420)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}\n{slurm.log_tail()}"
    assert info["Restarts"] == "1", f"requeued {info['Restarts']} times, expected once:\n{text[-4000:]}"
    assert "SIGUSR1 received" in text and f"requeueing job {job}" in text
    assert "stopped by SIGUSR1" in text, text[-4000:]

    (stop_step,) = resumed_at(text)  # the requeued job resumed once, from the stop's checkpoint
    spe = steps_per_epoch(digits)
    assert spe < stop_step < EPOCHS * spe, f"stopped at step {stop_step}: not mid-run after epoch 1"
    check_continued_run(run_dir, EPOCHS, spe, stop_step)
    losses = [value for _, value in read_scalars(run_dir)["train/loss"]]
    assert sum(losses[-5:]) < sum(losses[:5]), "the training loss did not fall"
    assert status(run_dir)["checkpoint"].endswith(f"checkpoint-{EPOCHS}.pth.tar")
    assert f"{engine} engine" in text


def test_chain_of_jobs_runs_in_order_and_continues_the_run(slurm, digits, tmp_path, engine):
    """--chain 3 with srun --mpi=pmix: the first job is stopped in its second (last) epoch,
    the second job continues and finishes, the third finds the run finished and does nothing."""
    epochs = 2
    if "pmix" not in slurm.run("srun", "--mpi=list", check=False).stdout:
        pytest.skip("srun --mpi=pmix is unavailable (Debian: libpmix2; tools/install_slurm.sh sets it up)")
    out = jobs_cli(
        "submit",
        *RESOURCES,
        "--launcher",
        "srun",
        "--chain",
        "3",
        "--engine",
        engine,
        "--",
        *train_args(digits, "chain", epochs),
        cwd=tmp_path,
        extra_env=slurm.env,
    ).stdout
    jobs = submitted_ids(out)
    assert len(jobs) == 3, out
    run_dir = tmp_path / "chain"
    script = (run_dir / "job.sbatch").read_text()
    assert "LAUNCHER=srun" in script and "#SBATCH --no-requeue" in script
    for before, after in zip(jobs, jobs[1:]):
        assert slurm.job(after)["Dependency"].startswith(f"afterany:{before}"), slurm.job(after)

    _signal_after_first_epoch(slurm, jobs[0], run_dir / f"slurm-{jobs[0]}.out", epochs)
    done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
    infos = [slurm.wait_job(j, done, timeout=420) for j in jobs]
    logs = [(run_dir / f"slurm-{j}.out").read_text() for j in jobs]
    for info, text in zip(infos, logs):
        assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
        assert info["Restarts"] == "0", "a job of a chain must not requeue itself"
    for first, then in zip(infos, infos[1:]):
        assert then["StartTime"] >= first["EndTime"], f"out of order: {first} / {then}"

    assert "stopped by SIGUSR1" in logs[0] and "the next job of the chain continues" in logs[0]
    assert resumed_at(logs[0]) == []
    (stop_step,) = resumed_at(logs[1])
    assert "finished training; nothing to do" in logs[2]
    check_continued_run(run_dir, epochs, steps_per_epoch(digits), stop_step)
    assert f"{engine} engine" in logs[1]


def test_multi_node_template_with_mpirun_trains_and_checkpoints(slurm, digits, tmp_path):
    """The many-node script's mpirun launch (Open MPI reading the allocation from SLURM), on
    the one node there is: one epoch, its checkpoint, a finished status."""
    template = ROOT / "largebatch" / "jobs" / "templates" / "slurm" / "multi-node.sbatch"
    out = jobs_cli(
        "submit",
        *RESOURCES,
        "--launcher",
        "mpirun",
        "--template",
        str(template),
        "--",
        *train_args(digits, "run", 1),
        cwd=tmp_path,
        extra_env=slurm.env,
    ).stdout
    (job,) = submitted_ids(out)
    run_dir = tmp_path / "run"
    assert "LAUNCHER=mpirun" in (run_dir / "job.sbatch").read_text()
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
    text = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert "2 process(es)" in text and "Warning" not in text, text[-4000:]
    final = status(run_dir)
    assert (final["state"], final["epoch"], final["step"]) == ("finished", 1, steps_per_epoch(digits))
    assert (run_dir / "checkpoint-1.pth.tar").is_file()
