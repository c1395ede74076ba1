"""The checkpoint store, the run-directory lock and atomic files, on real files and processes."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from largebatch import checkpoint
from largebatch.checkpoint import CheckpointError, CheckpointStore, CheckpointWriteError
from largebatch.config import UsageError, parse_config
from largebatch.files import atomic_write, clean_stale_temps, host
from largebatch.runlock import RunDirInUse, RunLock

BASE = ["--synthetic", "--model", "resnet18", "--epochs", "10", "--base-lr", "0.1"]
CFG = parse_config(BASE)
FORMAT = "checkpoint-{epoch}.pth.tar"


def state(epoch: int, step: int | None = None, numel: int = 1000, fill: float | None = None) -> dict:
    """A checkpoint-shaped dict of about ``6 * numel`` bytes: a weight of ``numel`` floats
    and a smaller momentum (so the file's middle falls inside the weight's bytes)."""
    weight = torch.full((numel,), fill) if fill is not None else torch.randn(numel)
    momentum = weight[: numel // 2].clone()
    return {
        "model": {"fc.weight": weight},
        "optimizer": {"state": {0: {"momentum_buffer": momentum}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": {},
        "scaler": None,
        "epoch": epoch,
        "step": epoch * 10 if step is None else step,
        "epoch_step": 0,
        "rng": [],
        "rank_buffers": [],
        "world_size": 1,
        "args": CFG.to_dict(),
        "version": checkpoint.VERSION,
    }


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / checkpoint.MANIFEST).read_text())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def corrupt_middle(path: Path, nbytes: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - nbytes // 2 : middle + nbytes // 2] = os.urandom(nbytes)
    path.write_bytes(bytes(data))


# --- names, rotation, same-run check ----------------------------------------------------------


def test_keep_last_k_and_mid_epoch_names(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, keep=2)
    assert store.name_for(3, 37, epoch_end=True) == "checkpoint-3.pth.tar"
    assert store.name_for(3, 37, epoch_end=False) == "checkpoint-3-step37.pth.tar"
    assert CheckpointStore(tmp_path, "ck-{epoch}-{step}.pt", 1).name_for(3, 37, False) == "ck-3-37.pt"

    store.save(state(1), epoch_end=True)
    store.save(state(1, step=15), epoch_end=False)
    newest = store.save(state(2), epoch_end=True)
    assert manifest(tmp_path)["files"] == ["checkpoint-1-step15.pth.tar", "checkpoint-2.pth.tar"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == manifest(tmp_path)["files"]
    assert store.latest() == newest
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_same_run_check_refuses_another_experiment(tmp_path):
    saved = state(1)
    checkpoint.check_same_run(saved, parse_config(BASE), tmp_path / "x")  # the same flags: accepted
    checkpoint.check_same_run(saved, parse_config(BASE + ["--momentum", "0.8"]), tmp_path / "x")  # not identity
    with pytest.raises(UsageError, match=r"--model resnet18 \(now resnet50\).*new --log-dir"):
        checkpoint.check_same_run(saved, parse_config([*BASE, "--model", "resnet50"]), tmp_path / "x")
    with pytest.raises(UsageError, match=r"--batch-size 32 \(now 64\)"):
        checkpoint.check_same_run(saved, parse_config([*BASE, "--batch-size", "64"]), tmp_path / "x")


# --- integrity --------------------------------------------------------------------------------


def test_checksum_recorded_while_writing_matches_the_file(tmp_path):
    path = CheckpointStore(tmp_path, FORMAT, 3).save(state(1), epoch_end=True)
    entry = manifest(tmp_path)["entries"][path.name]
    data = path.read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["size"] == len(data)
    assert entry["finite"] is True and entry["epoch"] == 1
    assert torch.load(path, weights_only=True)["epoch"] == 1  # still a plain torch checkpoint


def test_corrupted_newest_is_skipped_with_one_warning(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, 3)
    store.save(state(1, numel=100_000), True)
    newest = store.save(state(2, numel=100_000), True)
    corrupt_middle(newest)
    # What the issue saw: torch.load alone takes the damaged file (tensor bytes carry no CRC).
    assert torch.load(newest, weights_only=True)["epoch"] == 2

    warnings = []
    path, loaded = store.load_newest(warn=warnings.append)
    assert path.name == "checkpoint-1.pth.tar" and loaded["epoch"] == 1
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(newest) in warnings[0] and "sha256" in warnings[0] and warnings[0].startswith("warning: ")


def test_explicit_damaged_path_is_refused_in_one_line(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, 3)
    newest = store.save(state(1, numel=100_000), True)
    assert checkpoint.load(newest)["epoch"] == 1
    corrupt_middle(newest)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(newest)
    assert isinstance(err.value, UsageError)  # exit status 2, like every input problem
    assert str(err.value) == f"{newest} is damaged: its contents differ from what was written (sha256 mismatch)"


def test_truncated_checkpoint_listed_and_unlisted(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, 3)
    store.save(state(1), True)
    newest = store.save(state(2), True)
    whole = newest.read_bytes()
    newest.write_bytes(whole[: len(whole) // 2])

    warnings = []
    path, loaded = store.load_newest(warn=warnings.append)
    assert loaded["epoch"] == 1
    assert warnings == [
        f"warning: {newest} is truncated or damaged: it has {len(whole) // 2} bytes, "
        f"{len(whole)} were written; trying an older checkpoint"
    ]

    elsewhere = tmp_path / "copied" / "ck.pt"  # no manifest: its own zip structure tells
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        CheckpointError, match=r"ck.pt is truncated or damaged: its zip structure is broken \(.+\)$"
    ) as err:
        checkpoint.load(elsewhere)
    assert "\n" not in str(err.value)


def test_text_and_other_files_say_what_they_are_not(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("101\n")  # today: "cannot read checkpoint ...: 101"
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(text)
    assert str(err.value) == f"{text} is not a PyTorch checkpoint (a text file?)"

    binary = tmp_path / "random.bin"
    binary.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(CheckpointError, match=r"is not a PyTorch checkpoint \(unknown contents\)$"):
        checkpoint.load(binary)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        checkpoint.load(empty)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match=r"not a largebatch checkpoint \(missing args, epoch"):
        checkpoint.load(other)


def test_only_damaged_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, 3)
    only = store.save(state(1, numel=100_000), True)
    corrupt_middle(only)
    warnings = []
    with pytest.raises(CheckpointError, match=r"holds no usable checkpoint \(1 damaged\)"):
        store.load_newest(warn=warnings.append)
    assert len(warnings) == 1
    assert CheckpointStore(tmp_path / "empty", FORMAT, 3).load_newest() is None  # nothing there: a fresh start


def test_manifest_of_the_previous_version_still_loads(tmp_path):
    # What the previous version left: files only, no checksums.
    for epoch in (1, 2):
        torch.save(state(epoch), tmp_path / f"checkpoint-{epoch}.pth.tar")
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps({"files": ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"]}))
    store = CheckpointStore(tmp_path, FORMAT, 2)
    path, loaded = store.load_newest(warn=pytest.fail)
    assert path.name == "checkpoint-2.pth.tar" and loaded["epoch"] == 2
    assert checkpoint.load(tmp_path / "checkpoint-1.pth.tar")["epoch"] == 1

    store.save(state(3), True)  # continues the old manifest, now with entries
    data = manifest(tmp_path)
    assert data["files"] == ["checkpoint-2.pth.tar", "checkpoint-3.pth.tar"]
    assert list(data["entries"]) == ["checkpoint-3.pth.tar"]
    assert not (tmp_path / "checkpoint-1.pth.tar").exists()


def test_same_name_saved_twice_verifies(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, 2)
    store.save(state(1), True)
    path = store.save(state(1), True)  # a stop at an epoch end saves that position again
    assert manifest(tmp_path)["files"] == ["checkpoint-1.pth.tar"]
    assert "previous" not in manifest(tmp_path)["entries"][path.name]
    assert checkpoint.load(path)["epoch"] == 1


# --- finite -----------------------------------------------------------------------------------


def test_non_finite_checkpoints_never_rotate_out_the_newest_finite_one(tmp_path):
    store = CheckpointStore(tmp_path, FORMAT, keep=1)
    store.save(state(1), True)
    assert checkpoint.all_finite(state(2, fill=float("nan"))) is False
    store.save(state(2, fill=float("nan")), True)
    store.save(state(3, fill=float("inf")), True)
    data = manifest(tmp_path)
    assert data["files"] == ["checkpoint-1.pth.tar", "checkpoint-3.pth.tar"]
    assert [data["entries"][f]["finite"] for f in data["files"]] == [True, False]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == data["files"]

    assert store.load_newest()[1]["epoch"] == 3  # resume takes the newest, finite or not...
    warnings = []
    path, _ = store.load_newest(warn=warnings.append, finite_only=True)  # ...unless asked not to
    assert path.name == "checkpoint-1.pth.tar" and "non-finite" in warnings[0]

    store.save(state(4), True)  # finite again: the usual keep-1
    assert manifest(tmp_path)["files"] == ["checkpoint-4.pth.tar"]
    # The caller's word wins over the check (a loss that went NaN, say).
    store.save(state(5), True, finite=False)
    assert manifest(tmp_path)["files"] == ["checkpoint-4.pth.tar", "checkpoint-5.pth.tar"]


# --- stale temporaries ------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from largebatch.files import atomic_write
    def write(f):
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-save
    atomic_write(Path(sys.argv[1]), write)
""")


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "checkpoint-1.pth.tar")])
    assert proc.wait() == -signal.SIGKILL
    (left,) = tmp_path.glob(".checkpoint-1.pth.tar.tmp-*")
    assert left.name == f".checkpoint-1.pth.tar.tmp-{host()}-{proc.pid}"

    old_style = tmp_path / f".checkpoint-2.pth.tar.tmp{dead_pid()}"  # the previous writer's name
    live = tmp_path / f".checkpoint-3.pth.tar.tmp-{host()}-{os.getpid()}"
    other_host = tmp_path / f".checkpoint-4.pth.tar.tmp-not-{host()}-{dead_pid()}"
    keep = [tmp_path / "checkpoint-5.pth.tar", tmp_path / ".lock", tmp_path / "checkpoints.json"]
    for path in [old_style, live, other_host, *keep]:
        path.write_bytes(b"x")

    assert sorted(clean_stale_temps(tmp_path)) == sorted([left, old_style])
    assert sorted(tmp_path.iterdir()) == sorted([live, other_host, *keep])


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    path = tmp_path / "status.json"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"new, partly")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


# --- the run directory lock -------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from largebatch.runlock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_run_refused_until_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunDirInUse) as err:
            RunLock(tmp_path).acquire()
        started = json.loads((tmp_path / ".lock").read_text())["started"]
        assert str(err.value) == (
            f"--log-dir {tmp_path} is in use by a run on host {host()}, pid {holder.pid}, started {started}"
        )
        assert isinstance(err.value, UsageError)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: nothing stale to clean up.
    with RunLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirInUse, match=f"pid {os.getpid()}"):  # the kernel would grant it: refused here
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released on exit


# --- full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A real 3 MiB file system (tmpfs), so ENOSPC comes from the kernel."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.strip()}); "
            f"test_file_size_limit_gives_one_line covers the error path"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


MiB = 2**20


def test_full_disk_gives_one_line_and_keeps_the_previous_checkpoint(small_fs):
    store = CheckpointStore(small_fs, FORMAT, keep=1)
    first = store.save(state(1, numel=MiB // 3), True)  # 2 MiB: a second one does not fit
    before = (small_fs / checkpoint.MANIFEST).read_bytes()
    with pytest.raises(CheckpointWriteError) as err:
        store.save(state(2, numel=MiB // 3), True)
    message = str(err.value)
    assert message.startswith(
        f"cannot write checkpoint {small_fs / 'checkpoint-2.pth.tar'}: no space left (needs 2.0 MiB, "
    )
    assert (
        f"free on {small_fs}); the previous checkpoint {first} is intact; free space (a run needs room for "
        f"two checkpoints while it replaces one)" in message
    )
    assert "\n" not in message and isinstance(err.value, OSError) and err.value.errno == 28
    assert sorted(p.name for p in small_fs.iterdir()) == sorted([checkpoint.MANIFEST, first.name])  # no temp left
    assert (small_fs / checkpoint.MANIFEST).read_bytes() == before
    assert checkpoint.load(first)["epoch"] == 1


def test_room_for_keep_checkpoints_is_enough(small_fs):
    # 1.1 MiB each on 3 MiB: keep 1 needs room for two, keep 2 too: what rotates out anyway goes first.
    numel = 192_000  # 1.1 MiB
    for keep in (1, 2):
        store = CheckpointStore(small_fs, FORMAT, keep=keep)
        for epoch in range(1, 5):
            store.save(state(epoch, numel=numel), True)
        assert manifest(small_fs)["files"] == [f"checkpoint-{e}.pth.tar" for e in range(5 - keep, 5)]
        assert store.load_newest(warn=pytest.fail)[1]["epoch"] == 4
        for path in small_fs.iterdir():
            path.unlink()


def test_file_size_limit_gives_one_line(tmp_path):
    # Runs without root: RLIMIT_FSIZE makes write() fail with EFBIG (Python ignores SIGXFSZ).
    store = CheckpointStore(tmp_path, FORMAT, keep=2)
    first = store.save(state(1), True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, hard))
    try:
        with pytest.raises(CheckpointWriteError) as err:
            store.save(state(2, numel=MiB), True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value).startswith(
        f"cannot write checkpoint {tmp_path / 'checkpoint-2.pth.tar'}: file size limit (ulimit -f) exceeded (needs "
    )
    assert str(err.value).endswith(
        f"the previous checkpoint {first} is intact; free space, or lower --keep-checkpoints"
    )
    assert manifest(tmp_path)["files"] == [first.name] and not list(tmp_path.glob(".*tmp*"))


def test_resume_keeps_the_checkpoints_hyperparameters_and_says_so():
    """A changed --base-lr or --wd on resume cannot take effect (the optimizer's param groups
    and the schedule's state come back from the checkpoint): the run says so in one line."""
    import torch

    from largebatch import job
    from largebatch.config import parse_config

    def built(*flags):
        cfg = parse_config(["--synthetic", "--base-op", "lars", "--epochs", "2", "--warmup-epochs", "1", *flags])
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        optimizer = job.build_optimizer(cfg, model, cfg.lr(1))
        return cfg, optimizer, job.build_scheduler(cfg, optimizer, steps_per_epoch=5)

    old_cfg, old_opt, old_sched = built("--base-lr", "0.5", "--wd", "1e-3")
    new_cfg, new_opt, new_sched = built("--base-lr", "2", "--wd", "1e-4")
    new_opt.load_state_dict(old_opt.state_dict())
    new_sched.load_state_dict(old_sched.state_dict())
    for optimizer, schedule in ((old_opt, old_sched), (new_opt, new_sched)):
        optimizer.step()  # no gradients: nothing moves, but the schedule's step is in order
        schedule.step()
    assert [g["lr"] for g in new_opt.param_groups] == [g["lr"] for g in old_opt.param_groups]
    assert [g["weight_decay"] for g in new_opt.param_groups] == [g["weight_decay"] for g in old_opt.param_groups]

    line = checkpoint.ignored_changes({"args": old_cfg.to_dict()}, new_cfg)
    assert line == (
        "warning: --base-lr 2.0 (the checkpoint's: 0.5), --wd 0.0001 (the checkpoint's: 0.001): a resumed "
        "run keeps the checkpoint's values, which live on in its optimizer and schedule state; a new "
        "--log-dir starts a run with the new ones"
    )
    assert checkpoint.ignored_changes({"args": old_cfg.to_dict()}, old_cfg) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.complex64])
def test_one_non_finite_value_anywhere_makes_the_state_non_finite(bad, dtype):
    good = {
        "model": {"w": torch.ones(5, 3, dtype=dtype), "empty": torch.zeros(0, dtype=dtype), "steps": torch.tensor(7)},
        "optimizer": {"state": {0: {"momentum_buffer": -torch.ones(4, dtype=dtype)}}, "param_groups": []},
    }
    assert checkpoint.all_finite(good) is True
    for part, key in (("model", "w"), ("optimizer", None)):
        broken = {"model": dict(good["model"]), "optimizer": {"state": {0: {}}, "param_groups": []}}
        tensor = torch.ones(4, dtype=dtype)
        tensor[2] = bad if not dtype.is_complex else complex(1, bad)  # the imaginary part counts too
        if key:
            broken["model"][key] = tensor
        else:
            broken["optimizer"]["state"][0]["momentum_buffer"] = tensor
        assert checkpoint.all_finite(broken) is False, (part, dtype, bad)
