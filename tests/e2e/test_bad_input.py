"""Bad input ends the job with one clear line and exit status 2, on every rank, with no
traceback and no rank left waiting.

What one process shows runs the entry scripts' main in the test's process (run_in_process:
no 9 s of importing torch per case); the first test runs the script as a process, and the
two-rank test under mpirun."""

from __future__ import annotations

import shutil

import pytest

from helpers import job_args, run_in_process, run_job


def assert_usage_error(proc, *fragments):
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert lines, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_flag_errors_before_any_work(tmp_path):
    # The script itself, as a process: one line on stderr, exit 2.
    proc = run_job(["--synthetic", "--batch-size", "-3"], np=1, check=False)
    assert_usage_error(proc, "--batch-size", "positive integer")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_in_process(["--train-dir", tmp_path, "--synthetic"])
    assert_usage_error(proc, "--synthetic")


@pytest.mark.mpi
def test_missing_data_directory_stops_both_ranks(tmp_path, engine):
    proc = run_job(
        job_args(tmp_path / "nowhere", tmp_path / "run", "--epochs", "1", "--engine", engine),
        np=2,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--train-dir" in proc.stderr and "no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_data_directory(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    proc = run_in_process(job_args(tmp_path, tmp_path / "run", "--epochs", "1"))
    assert_usage_error(proc, "--train-dir", "class folder")


def test_validation_classes_differ(digits, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    shutil.rmtree(data / "val" / "7")
    proc = run_in_process(job_args(data, tmp_path / "run", "--epochs", "1"))
    assert_usage_error(proc, "classes differ", "7")


def test_batch_larger_than_data(digits, tmp_path):
    proc = run_in_process(job_args(digits, tmp_path / "run", "--epochs", "1", "--batch-size", "400"))
    assert_usage_error(proc, "--batch-size 400", "320")


def test_unwritable_log_dir(digits, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_in_process(job_args(digits, blocker / "run", "--epochs", "1"))
    assert_usage_error(proc, "--log-dir", "not writable")


def test_checkpoints_of_another_run_are_never_overwritten(one_process_run, digits, tmp_path):
    """A copy of a finished one-process run (conftest.py), asked to start over or to go on
    with another batch size: refused, its checkpoints untouched."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_process_run.run_dir, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.glob("checkpoint-*")}
    assert "checkpoint-1.pth.tar" in before
    proc = run_in_process(job_args(digits, run_dir, *one_process_run.flags, "--resume", "none"))
    assert_usage_error(proc, "already holds checkpoints")
    proc = run_in_process(job_args(digits, run_dir, *one_process_run.flags, "--batch-size", "8"))
    assert_usage_error(proc, "--batch-size 16 (now 8)", "new --log-dir")
    assert {p.name: p.read_bytes() for p in run_dir.glob("checkpoint-*")} == before
