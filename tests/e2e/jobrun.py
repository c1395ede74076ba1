"""Shared by the scheduler tests: render/submit through the real command, follow a job's
log, and read back what a run that was stopped and continued left behind."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from tensorboardX.proto import event_pb2

from helpers import FAST, PYTHON, env
from largebatch.events import read_records


def train_args(data: Path, log_dir: str, epochs: int) -> list[str]:
    return [
        "--train-dir",
        str(data / "train"),
        "--val-dir",
        str(data / "val"),
        "--log-dir",
        log_dir,
        *FAST,
        "--epochs",
        str(epochs),
        "--seed",
        "3",
    ]


def jobs_cli(*args: str, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m largebatch.jobs ..., as a user runs it; fails the test on a non-zero exit."""
    proc = subprocess.run(
        [PYTHON, "-m", "largebatch.jobs", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**env(), **(extra_env or {})},
    )
    assert proc.returncode == 0, f"largebatch.jobs {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def submitted_ids(stdout: str) -> list[str]:
    return re.findall(r"submitted job (\S+)", stdout)


def wait_for_text(path: Path, text: str, timeout: float, alive=lambda: True) -> str:
    """Poll a growing log until it holds ``text``; fails when time runs out or alive() turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if not alive():
            break
        time.sleep(0.3)
    content = path.read_text(errors="replace") if path.exists() else "(no log)"
    raise AssertionError(f"{text!r} never appeared in {path}:\n{content[-4000:]}")


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def resumed_at(log: str) -> list[int]:
    """The global steps the training resumed from, in order (printed by rank 0)."""
    return [int(s) for s in re.findall(r"resuming from \S+ \(epoch \d+, step (\d+)\)", log)]


def steps_per_epoch(data: Path, ranks: int = 2) -> int:
    """As the sampler counts: each rank's equal share of the training images, in whole batches."""
    images = sum(1 for p in (data / "train").rglob("*") if p.is_file())
    return images // ranks // int(FAST[FAST.index("--batch-size") + 1])


def step_counts(event_files: list[Path], tag: str) -> Counter:
    """How many times each step was logged for ``tag`` in these event files, without the
    de-duplication a reader (TensorBoard, events.read_scalars) applies."""
    counts: Counter = Counter()
    for path in event_files:
        for payload in read_records(path):
            event = event_pb2.Event.FromString(payload)
            counts.update(event.step for v in event.summary.value if v.tag == tag)
    return counts


def check_continued_run(run_dir: Path, epochs: int, steps_per_epoch: int, stop_step: int) -> None:
    """The run finished every epoch exactly once across its jobs: each optimizer step was
    trained (logged) once, each epoch validated once, and the second job began right after
    the checkpoint the first one wrote when it was stopped."""
    total = epochs * steps_per_epoch
    final = status(run_dir)
    assert (final["state"], final["epoch"], final["step"]) == ("finished", epochs, total), final
    files = sorted(run_dir.glob("events.out.tfevents.*"))  # one per job, oldest first
    assert len(files) == 2, f"expected an event file from each of the two jobs: {files}"
    train = step_counts(files, "train/loss")
    assert sorted(train) == list(range(1, total + 1)), f"steps lost: {sorted(set(range(1, total + 1)) - set(train))}"
    assert set(train.values()) == {1}, f"steps trained twice: {sorted(s for s, n in train.items() if n > 1)}"
    val = step_counts(files, "val/top1")
    assert val == Counter({steps_per_epoch * (e + 1): 1 for e in range(epochs)}), f"validations: {val}"
    began = min(
        step_counts(files[1:], "train/loss"), default=total + 1
    )  # nothing left to train when stopped at the very last step
    assert began == stop_step + 1, f"the second job began at step {began}, the first stopped at {stop_step}"
