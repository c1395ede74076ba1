"""`python -m largebatch.jobs start|continue RUN_DIR`: the job scripts' decisions before and
after the training, from the run's status.json, and the templates' use of them. (The whole
cycle, with SLURM's requeue and PBS chains, runs in tests/e2e/test_slurm.py and test_pbs.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from largebatch.jobs.cli import main

TRAIN = ["--train-dir", "/data/train", "--val-dir", "/data/val", "--log-dir", "run", "--epochs", "90"]


def write_status(run_dir: Path, state: str, step: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps({"state": state, "epoch": 1, "step": step, "checkpoint": None}))


def jobs(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_start_prints_the_step_the_run_is_at(tmp_path, capsys):
    assert jobs(capsys, "start", tmp_path / "new") == (0, "0\n", ""), "no status.json: a new run, step 0"
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "status.json").write_text('{"state": "stopp')
    assert jobs(capsys, "start", tmp_path / "torn")[:2] == (0, "0\n")
    for state in ("running", "stopped"):  # running: the job before crashed or was killed
        write_status(tmp_path / state, state, 40)
        assert jobs(capsys, "start", tmp_path / state) == (0, "40\n", "")


def test_start_exits_3_for_a_finished_run(tmp_path, capsys):
    write_status(tmp_path, "finished", 90)
    rc, out, err = jobs(capsys, "start", tmp_path)
    assert (rc, out) == (3, "")
    assert err == f"largebatch: {tmp_path} has finished training; nothing to do\n"


@pytest.mark.parametrize(
    "state, step, how, rc, said",
    [
        ("finished", 90, "chain", 0, None),
        ("stopped", 41, "chain", 0, "the next job of the chain continues from step 41"),
        ("stopped", 41, "none", 0, "submit this script again to continue from step 41"),
        ("stopped", 40, "chain", 1, "no orderly stop after progress in this job"),  # stopped where it began
        ("running", 55, "chain", 1, "no orderly stop after progress in this job"),  # crashed mid-run
        ("none", 0, "none", 1, "no orderly stop after progress in this job"),  # never checkpointed
    ],
)
def test_continue_carries_on_only_an_orderly_stop_after_progress(tmp_path, capsys, state, step, how, rc, said):
    if state != "none":
        write_status(tmp_path, state, step)
    got, out, err = jobs(capsys, "continue", tmp_path, "--since", 40, "--how", how)
    assert got == rc and out == ""
    assert err.startswith(f"largebatch: training left {tmp_path} {state} at step {step}\n"), err
    if said:
        assert said in err
    assert err.count("\n") == (1 if said is None else 2)


def test_continue_does_not_requeue_a_stop_by_sigterm(tmp_path, capsys):
    write_status(tmp_path, "stopped", 41)
    rc, _, err = jobs(capsys, "continue", tmp_path, "--since", 40, "--how", "requeue", "--warned", 0, "--job-id", 77)
    assert rc == 0 and "stopped by SIGTERM (cancelled or preempted): not requeueing" in err


def test_continue_says_so_when_slurm_cannot_requeue(tmp_path, capsys, monkeypatch):
    # No scontrol on PATH: the requeue cannot happen and the job must not claim it did.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    write_status(tmp_path, "stopped", 41)
    rc, _, err = jobs(capsys, "continue", tmp_path, "--since", 40, "--how", "requeue", "--warned", 1, "--job-id", 77)
    assert rc == 1
    assert "requeueing job 77 to continue from step 41" in err and "SLURM refused to requeue" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["continue", "run", "--since", "4", "--how", "requeue"], "--how requeue needs --job-id"),
        (["continue", "run", "--since", "4", "--how", "again"], "invalid choice: 'again'"),
        (["continue", "run", "--how", "chain"], "required: --since"),
        (["start"], "required: RUN_DIR"),
    ],
)
def test_bad_calls_are_refused_in_one_line(capsys, argv, message):
    rc, out, err = jobs(capsys, *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "scheduler, template_env",
    [
        ("slurm", {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "here"}),
        ("pbs", {"PBS_JOBID": "5.server", "PBS_NODEFILE": "/dev/null", "PBS_O_WORKDIR": "/"}),
    ],
)
def test_a_rendered_script_of_a_finished_run_ends_at_once(tmp_path, monkeypatch, capsys, scheduler, template_env):
    """The templates ask `start` instead of reading status.json themselves: a rendered script,
    run by bash, leaves a finished run alone without starting mpirun."""
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "render",
                "--scheduler",
                scheduler,
                "--gpus-per-node",
                "0",
                "--ranks-per-node",
                "2",
                "--time",
                "01:00:00",
                "--warning",
                "60",
                "--",
                *TRAIN,
            ]
        )
        == 0
    )
    capsys.readouterr()
    run_dir = tmp_path / "run"
    write_status(run_dir, "finished", 90)
    script = run_dir / f"job.{'sbatch' if scheduler == 'slurm' else 'pbs'}"
    # No mpirun on PATH: reaching the launch would fail the job, not end it with status 0.
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "mpirun").exists())
    proc = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PATH": path, **template_env},
    )
    log = proc.stdout + proc.stderr + "".join(p.read_text() for p in run_dir.glob("pbs-*.out"))
    assert proc.returncode == 0, log
    assert f"{run_dir} has finished training; nothing to do" in log
