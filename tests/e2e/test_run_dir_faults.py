"""Faults of the second round (issue 22), each injected into a real run: the run directory's
manifest lost or planted, links planted where the job writes, a checkpoint copied away and
damaged, a resume on another process count, bad transforms and mostly unreadable data,
decoder warnings and odd file names. What must hold is checked on the files: nothing lost,
nothing outside the run directory touched, one line for the user."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_bad_input import assert_usage_error
from torchvision import transforms

from helpers import job_args, load_checkpoint, run_in_process, run_job
from largebatch import checkpoint
from largebatch.files import host

OUTSIDE_TEXT = "a user's file outside the run directory\n"


def victims(tmp_path: Path, *names: str) -> list[Path]:
    folder = tmp_path / "outside"
    folder.mkdir(exist_ok=True)
    paths = [folder / name for name in names]
    for path in paths:
        path.write_text(OUTSIDE_TEXT)
    return paths


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


# --- the manifest lost ---------------------------------------------------------------------------


def test_lost_manifest_is_rebuilt_and_the_run_resumes_where_it_stopped(one_process_run, digits, tmp_path):
    """checkpoints.json deleted (and the newest checkpoint with it): --resume auto rebuilds the
    manifest from the verified files, says so in one line, resumes from epoch 1 and ends with
    the uninterrupted run's weights, bit for bit. The modes a user set stay: status.json's
    600 survives its rewrites and the new checkpoint takes the previous one's."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_process_run.run_dir, run_dir)
    reference = load_checkpoint(run_dir / "checkpoint-2.pth.tar")
    (run_dir / checkpoint.MANIFEST).unlink()
    (run_dir / "checkpoint-2.pth.tar").unlink()
    for name in ("status.json", "checkpoint-1.pth.tar"):
        (run_dir / name).chmod(0o600)

    proc = run_job(job_args(digits, run_dir, *one_process_run.flags), np=1)
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert warnings == [
        f"warning: {run_dir / checkpoint.MANIFEST} was missing; rebuilt it from the 1 verified "
        f"checkpoint file(s) in the run directory"
    ], proc.stderr
    assert f"resuming from {run_dir / 'checkpoint-1.pth.tar'} (epoch 1, step 20)" in proc.stdout
    resumed = load_checkpoint(run_dir / "checkpoint-2.pth.tar")
    assert resumed["step"] == reference["step"] == 40
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert stat.S_IMODE((run_dir / "status.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((run_dir / "checkpoint-2.pth.tar").stat().st_mode) == 0o600


def test_a_run_whose_checkpoints_are_all_gone_is_never_restarted(one_process_run, digits, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(one_process_run.run_dir, run_dir)
    for path in [*run_dir.glob("checkpoint*")]:
        path.unlink()
    before = (run_dir / "status.json").read_bytes()
    proc = run_in_process(job_args(digits, run_dir, *one_process_run.flags))
    assert_usage_error(
        proc,
        f"--log-dir {run_dir}: status.json says the run reached step 40 (finished), but none "
        f"of its checkpoints is there",
    )
    assert (run_dir / "status.json").read_bytes() == before and not list(run_dir.glob("checkpoint*"))


# --- planted manifests and links -------------------------------------------------------------------


def test_planted_manifest_and_links_leave_files_outside_alone(digits, tmp_path):
    """A manifest naming files outside, and links named like each file the run creates
    (its write probe, the temporaries of status.json, the manifest and the first checkpoints,
    all with this process's pid): the run trains from scratch, rotates, and touches none
    of the files outside."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    a, b, *targets = victims(tmp_path, "a", "b", "probe", "status", "manifest", "ck5", "ck10")
    (run_dir / checkpoint.MANIFEST).write_text(json.dumps({"files": ["../outside/a", str(b)]}))
    me = f"{host()}-{os.getpid()}"  # run_in_process: the job's pid is this one
    names = [
        f".write-test-{os.getpid()}",
        f".status.json.tmp-{me}",
        f".{checkpoint.MANIFEST}.tmp-{me}",
        f".checkpoint-1-step5.pth.tar.tmp-{me}",
        f".checkpoint-1-step10.pth.tar.tmp-{me}",
    ]
    for name, target in zip(names, targets):
        (run_dir / name).symlink_to(target)

    proc = run_in_process(
        job_args(
            digits, run_dir, "--epochs", "1", "--checkpoint-every", "5", "--keep-checkpoints", "1", "--print-freq", "5"
        )
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(p.read_text() == OUTSIDE_TEXT for p in (a, b, *targets))
    assert "was damaged (it names '../outside/a'" in proc.stderr
    assert status(run_dir)["state"] == "finished"
    assert json.loads((run_dir / checkpoint.MANIFEST).read_text())["files"] == ["checkpoint-1.pth.tar"]


def test_a_lock_file_that_is_a_link_is_refused(digits, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (target,) = victims(tmp_path, "lock")
    (run_dir / ".lock").symlink_to(target)
    proc = run_in_process(job_args(digits, run_dir, "--epochs", "1"))
    assert_usage_error(proc, f"its lock file {run_dir / '.lock'} is a symbolic link")
    assert target.read_text() == OUTSIDE_TEXT


def test_checkpoint_format_outside_the_run_directory_is_refused(digits, tmp_path):
    (parent_file,) = victims(tmp_path, "ck-1.pth")
    proc = run_in_process(
        job_args(digits, tmp_path / "outside" / "run", "--epochs", "1", "--checkpoint-format", "../ck-{epoch}.pth")
    )
    assert_usage_error(proc, "--checkpoint-format '../ck-{epoch}.pth': must be a file name in the run directory")
    assert parent_file.read_text() == OUTSIDE_TEXT


# --- a checkpoint away from its run; another process count ------------------------------------------


def test_a_copied_checkpoint_with_bytes_moved_is_refused(one_process_run, digits, tmp_path):
    copy = tmp_path / "copied.pth.tar"
    data = bytearray((one_process_run.run_dir / "checkpoint-1.pth.tar").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = data[middle - 8192 : middle - 4096]  # 4 KiB of its own bytes moved
    copy.write_bytes(bytes(data))
    proc = run_in_process(job_args(digits, tmp_path / "run", *one_process_run.flags, "--resume", copy))
    assert_usage_error(proc, f"{copy} is damaged: its member archive/data/", "fails its CRC-32 check")
    assert len(error_lines(proc.stderr)) == 1 and not (tmp_path / "run" / "checkpoint-2.pth.tar").exists()


def test_a_non_torch_pickle_is_refused_without_a_torch_warning(one_process_run, digits, tmp_path):
    import pickle

    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    proc = run_in_process(job_args(digits, tmp_path / "run", *one_process_run.flags, "--resume", other))
    assert_usage_error(proc, f"{other} is truncated or damaged: torch.load fails")
    assert "Warning" not in proc.stderr, proc.stderr


@pytest.mark.mpi
def test_a_resume_on_another_number_of_processes_is_refused(straight_runs, digits, tmp_path):
    """2 -> 1 trained a whole epoch at rate 0 and said "finished"; now: one line, nothing written."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight_runs("horovod").run_dir, run_dir)
    (run_dir / "checkpoint-2.pth.tar").unlink()  # so that a run would have something left to do
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    proc = run_in_process(job_args(digits, run_dir, *straight_runs("horovod").flags))
    assert_usage_error(
        proc,
        "was written by 2 processes (global batch 32) and this run has 1 (global batch 16)",
        "resume it on 2 processes",
    )
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name in before} == before


# --- data: a transform that fails, data mostly unreadable, warnings and odd names ---------------------


def test_a_transform_that_fails_stops_the_run_in_one_line(digits, tmp_path, monkeypatch):
    """A bug in the transform (here, one that raises), not an unreadable image: one line, exit 2."""
    from largebatch.data import folder

    def broken(image):
        raise ValueError("a transform bug")

    monkeypatch.setattr(folder, "train_transform", lambda cfg, uint8=False: transforms.Compose([broken]))
    run_dir = tmp_path / "run"
    proc = run_in_process(job_args(digits, run_dir, "--epochs", "1"))
    assert_usage_error(proc, "the transform failed on", "(ValueError: a transform bug), which decoded")
    assert "skipping unreadable image" not in proc.stderr
    assert not (run_dir / "status.json").exists()


def test_a_run_on_mostly_unreadable_images_fails(digits, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    for folder in (data / "train").iterdir():
        for path in sorted(folder.iterdir())[2:]:  # two readable images per class
            path.write_bytes(b"not an image")
    run_dir = tmp_path / "run"
    proc = run_in_process(job_args(data, run_dir, "--epochs", "2"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "stopped: epoch 1 trained on" in line]
    assert len(lines) == 1 and "of the 320 images it read; the rest were unreadable" in lines[0], proc.stdout[-2000:]
    assert status(run_dir)["state"] == "failed" and not list(run_dir.glob("checkpoint*"))
    assert "finished" not in proc.stdout


def test_decoder_warnings_and_odd_names_are_one_line_each(digits, tmp_path):
    """PIL's warning on a very large image is one line, not Python's two; `photo (1).jpg` and
    `photo (2).jpg` are two files, and a newline in a name stays inside its one line."""
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    big = data / "train" / "4" / "big.png"
    Image.new("L", (9500, 9500)).save(big)  # over PIL's 89.5M-pixel warning, under its error
    broken = [
        data / "train" / "5" / "photo (1).jpg",
        data / "train" / "5" / "photo (2).jpg",
        data / "train" / "6" / "new\nline.jpg",
    ]
    for path in broken:
        path.write_bytes(b"not an image")
    for label in "0123":  # 320 images again: one epoch of 20 batches of 16 reads every one
        sorted((data / "train" / label).iterdir())[-1].unlink()
    proc = run_in_process(job_args(data, tmp_path / "run", "--epochs", "1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert [line for line in lines if "big.png" in line] == [
        line
        for line in lines
        if line.startswith(
            f"warning: image {big} (DecompressionBombWarning: Image size (90250000 pixels) exceeds limit"
        )
    ], proc.stderr
    assert len([line for line in lines if "big.png" in line]) == 1 and "warnings.warn" not in proc.stderr
    for path in broken[:2]:
        assert len([line for line in lines if f"skipping unreadable image {path} (" in line]) == 1, proc.stderr
    escaped = str(broken[2]).replace("\n", "\\n")
    assert len([line for line in lines if f"skipping unreadable image {escaped} (" in line]) == 1, proc.stderr


def test_a_train_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "train").write_text("")
    (tmp_path / "val").mkdir()
    proc = run_in_process(job_args(tmp_path, tmp_path / "run", "--epochs", "1"))
    assert_usage_error(proc, f"--train-dir {tmp_path / 'train'}: not a directory")


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_step_decay_at_an_infinite_epoch_is_refused(digits, tmp_path, value):
    proc = run_in_process(job_args(digits, tmp_path / "run", "--lr-schedule", "step", "--lr-decay-epochs", value))
    assert_usage_error(proc, "--lr-decay-epochs", "increasing positive epochs")


@pytest.mark.mpi
def test_lost_manifest_of_a_two_process_horovod_run(straight_runs, digits, tmp_path):
    """The same on Horovod, 2 processes under mpirun: the manifest and the newest checkpoint
    gone, the run rebuilds the manifest, resumes from the older one and ends bit for bit where
    the uninterrupted run ended."""
    reference = straight_runs("horovod")
    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    (run_dir / checkpoint.MANIFEST).unlink()
    (run_dir / "checkpoint-2.pth.tar").unlink()
    proc = run_job(job_args(digits, run_dir, *reference.flags, "--engine", "horovod"))
    assert "was missing; rebuilt it from the 1 verified checkpoint file(s)" in proc.stderr, proc.stderr[-2000:]
    assert f"resuming from {run_dir / 'checkpoint-1-step15.pth.tar'} (epoch 1, step 15)" in proc.stdout
    a, b = (
        load_checkpoint(reference.run_dir / "checkpoint-2.pth.tar"),
        load_checkpoint(run_dir / "checkpoint-2.pth.tar"),
    )
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
