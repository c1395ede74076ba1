"""What the job writes and deletes stays inside its run directory and its own files (issue 22):
planted manifests, planted links, the manifest lost, checkpoints copied away, modes a user
set. Real files; the job itself runs in tests/e2e/test_run_dir_faults.py."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from test_checkpoint import FORMAT, manifest, state

from largebatch import checkpoint
from largebatch.checkpoint import CheckpointError, CheckpointStore
from largebatch.config import UsageError, parse_config
from largebatch.files import atomic_write, temp_path
from largebatch.runlock import RunLock


def victim(tmp_path: Path, name: str = "victim.txt") -> Path:
    path = tmp_path / "outside" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("a user's file outside the run directory\n")
    return path


def untouched(path: Path) -> bool:
    return path.read_text() == "a user's file outside the run directory\n"


# --- links planted where the job writes --------------------------------------------------------


def test_atomic_write_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    target = victim(tmp_path)
    path = tmp_path / "status.json"
    temp_path(path).symlink_to(target)
    atomic_write(path, lambda f: f.write(b"{}\n"))
    assert untouched(target)
    assert path.read_text() == "{}\n" and not path.is_symlink()
    assert not temp_path(path).exists()


def test_atomic_write_replaces_a_link_instead_of_following_it(tmp_path):
    target = victim(tmp_path)
    path = tmp_path / "status.json"
    path.symlink_to(target)
    atomic_write(path, lambda f: f.write(b"{}\n"))
    assert untouched(target) and not path.is_symlink()


def test_a_lock_file_that_is_a_link_is_refused(tmp_path):
    target = victim(tmp_path)
    (tmp_path / ".lock").symlink_to(target)
    with pytest.raises(UsageError, match=r"its lock file .*\.lock is a symbolic link; remove the link"):
        RunLock(tmp_path).acquire()
    assert untouched(target)


# --- modes ------------------------------------------------------------------------------------------


def test_a_rewritten_file_keeps_the_mode_the_user_set(tmp_path):
    path = tmp_path / "status.json"
    atomic_write(path, lambda f: f.write(b"1"))
    path.chmod(0o600)
    atomic_write(path, lambda f: f.write(b"2"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "2"


def test_a_new_checkpoint_takes_the_mode_of_the_previous_one(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, 3)
    first = store.save(state(1), True)
    first.chmod(0o600)
    assert stat.S_IMODE(store.save(state(2), True).stat().st_mode) == 0o600


# --- the manifest: planted, lost, damaged -------------------------------------------------------------


def test_a_manifest_naming_files_outside_is_damaged_and_rebuilt(tmp_path):
    """Rotation of a planted manifest deleted what it named; now a name with a path in it
    makes the manifest damaged, it is rebuilt from the run's own files, and nothing outside
    is touched."""
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir, FORMAT, 1, warn=(said := []).append)
    run_dir.mkdir()
    a, b = victim(tmp_path, "a"), victim(tmp_path, "b")
    (run_dir / checkpoint.MANIFEST).write_text(json.dumps({"files": ["../outside/a", str(b)]}))
    store.save(state(1), True)
    store.save(state(2), True)
    assert untouched(a) and untouched(b)
    assert manifest(run_dir)["files"] == ["checkpoint-2.pth.tar"]
    assert len(said) == 1 and "was damaged (it names '../outside/a'" in said[0], said


def test_rotation_deletes_only_names_the_format_gives(tmp_path):
    """A manifest that lists a user's file inside the run directory: it is never deleted."""
    run_dir = tmp_path
    notes = run_dir / "notes.txt"
    notes.write_text("mine")
    (run_dir / checkpoint.MANIFEST).write_text(json.dumps({"files": ["notes.txt"]}))
    store = CheckpointStore(run_dir, FORMAT, 1)
    store.save(state(1), True)
    store.save(state(2), True)
    assert notes.read_text() == "mine"
    assert manifest(run_dir)["files"] == ["checkpoint-2.pth.tar"]


@pytest.mark.parametrize(
    "fmt, names, others",
    [
        (FORMAT, ["checkpoint-3.pth.tar", "checkpoint-3-step25.pth.tar"], ["checkpoint-x.pth.tar", "notes.txt"]),
        ("ck-{epoch}-{step}.pt", ["ck-1-10.pt"], ["ck-1.pt", "ck-1-10.pt.bak"]),
        ("./run{epoch}", ["run2", "run2-step5"], ["run", ".run2"]),
    ],
)
def test_the_formats_own_names(tmp_path, fmt, names, others):
    store = CheckpointStore(tmp_path, fmt, 1)
    assert all(store.is_ours(n) for n in names) and not any(store.is_ours(n) for n in others)


def test_a_lost_manifest_is_rebuilt_from_the_verified_files(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, 3, warn=(said := []).append)
    for epoch in (1, 2, 3):
        store.save(state(epoch, fill=float("nan") if epoch == 3 else None), True)
    before = manifest(tmp_path)
    (tmp_path / checkpoint.MANIFEST).unlink()
    damaged = tmp_path / "checkpoint-2.pth.tar"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte: the CRC-32 of its member tells
    damaged.write_bytes(bytes(data))

    path, loaded = store.load_newest(finite_only=True)
    assert (path.name, loaded["epoch"]) == ("checkpoint-1.pth.tar", 1)
    rebuilt = manifest(tmp_path)
    assert rebuilt["files"] == ["checkpoint-1.pth.tar", "checkpoint-3.pth.tar"]
    assert rebuilt["entries"]["checkpoint-3.pth.tar"]["finite"] is False
    assert rebuilt["entries"]["checkpoint-1.pth.tar"] == before["entries"]["checkpoint-1.pth.tar"]
    assert said[0] == (
        f"warning: {tmp_path / checkpoint.MANIFEST} was missing; rebuilt it from the 2 verified "
        f"checkpoint file(s) in the run directory, 1 damaged one(s) left out (checkpoint-2.pth.tar)"
    )
    assert store.latest(finite_only=True).name == "checkpoint-1.pth.tar"
    assert store.latest().name == "checkpoint-3.pth.tar"


def test_an_empty_run_directory_needs_no_manifest(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, 3, warn=pytest.fail)
    assert store.load_newest() is None and not (tmp_path / checkpoint.MANIFEST).exists()


# --- a checkpoint away from its run directory -----------------------------------------------------------


def test_a_copied_checkpoint_with_bytes_moved_is_refused(tmp_path):
    """4 KiB of its own bytes moved within it: torch.load accepts it; the CRC-32s do not."""
    (tmp_path / "run").mkdir()
    path = CheckpointStore(tmp_path / "run", FORMAT, 1).save(state(1, numel=20000), True)
    copy = tmp_path / "elsewhere.pth.tar"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = data[middle - 8192 : middle - 4096]
    copy.write_bytes(bytes(data))
    torch.load(copy, weights_only=True)  # the damage this is about: it loads
    with pytest.raises(
        CheckpointError,
        match=r"elsewhere.pth.tar is damaged: its member archive/data/\d+ fails its "
        r"CRC-32 check$",
    ):
        checkpoint.load(copy)
    intact = tmp_path / "intact.pth.tar"
    intact.write_bytes(path.read_bytes())
    assert checkpoint.load(intact)["epoch"] == 1


def test_a_foreign_pickle_says_so_without_a_torch_warning(tmp_path, recwarn):
    import pickle

    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"x": Path("a")}))
    with pytest.raises(CheckpointError, match="other.pkl is truncated or damaged: torch.load fails"):
        checkpoint.load(path)
    assert not [w for w in recwarn if "torch" in str(w.filename)], [str(w.message) for w in recwarn]


# --- another number of processes -------------------------------------------------------------------------


def test_a_resume_on_another_number_of_processes_is_refused():
    saved = {**state(1), "world_size": 2, "args": {"batch_size": 16, "batches_per_allreduce": 2}}
    checkpoint.check_world_size(saved, 2, Path("ck.pth.tar"))
    with pytest.raises(UsageError) as err:
        checkpoint.check_world_size(saved, 1, Path("ck.pth.tar"))
    assert str(err.value) == (
        "ck.pth.tar was written by 2 processes (global batch 64) and this run has 1 (global "
        "batch 32): its schedule and data order hold only for 2; resume it on 2 processes, or "
        "start a new run in a new --log-dir"
    )


# --- flags that pointed outside or broke the transform ----------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint-format", "../ck-{epoch}.pth"], "must be a file name in the run directory"),
        (["--checkpoint-format", "/tmp/ck-{epoch}.pth"], "must be a file name in the run directory"),
        (["--checkpoint-format", ".ck-{epoch}"], "without a path or a leading dot"),
        (["--crop-ratio", "1,inf"], "must be finite numbers with 0 < LOW <= HIGH"),
        (["--crop-scale", "nan,1"], "must be finite numbers with 0 < LOW <= HIGH"),
        (["--lr-schedule", "step", "--lr-decay-epochs", "inf"], "must be increasing positive epochs"),
        (["--lr-schedule", "step", "--lr-decay-epochs", "30,nan"], "must be increasing positive epochs"),
    ],
)
def test_flags_that_escape_the_run_directory_or_cannot_compute_are_refused(flags, message):
    with pytest.raises(UsageError, match=message):
        parse_config(["--synthetic", *flags])


def test_the_current_directory_prefix_still_names_a_file_in_the_run_directory(tmp_path):
    cfg = parse_config(["--synthetic", "--checkpoint-format", "./ck-{epoch}.pt"])
    store = CheckpointStore(tmp_path, cfg.run.checkpoint_format, 1)
    assert store.save(state(1), True) == tmp_path / "ck-1.pt"
    assert manifest(tmp_path)["files"] == ["ck-1.pt"]
