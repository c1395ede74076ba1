"""Full-state checkpoints: atomic writes, keep the last K, find the newest, refuse to mix runs.

A checkpoint is one ``torch.save`` dict with the keys ``model``, ``optimizer``,
``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``step`` (optimizer steps
completed), ``epoch_step`` (steps completed within ``epoch``; the data order's position),
``rng`` (each rank's torch RNG state), ``rank_buffers`` (each rank's batch-norm running
statistics, which differ between the epoch-end averagings), ``world_size``, ``args`` and
``version``. Only plain
types and tensors go in, so it loads with ``torch.load(weights_only=True)``.

The run directory keeps ``checkpoints.json``, the list of files in the order written; the
last entry is the newest. Files are written to a temporary name, flushed to disk and
renamed, so a job killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import Config, UsageError

MANIFEST = "checkpoints.json"
VERSION = 1
# Flags that define what a run is: resuming with any of them changed would continue a
# different experiment from this one's weights, so it is refused.
IDENTITY = ("model", "num_classes", "batch_size", "batches_per_allreduce", "base_op", "epochs",
            "lr_schedule", "image_size", "synthetic")


class Checkpoints:
    def __init__(self, run_dir: Path, name_format: str, keep: int):
        self.run_dir, self.name_format, self.keep = run_dir, name_format, keep

    def _files(self) -> list[str]:
        try:
            return json.loads((self.run_dir / MANIFEST).read_text())["files"]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError) as e:
            raise UsageError(f"{self.run_dir / MANIFEST} is damaged ({e}); fix or remove it") from None

    def latest(self) -> Path | None:
        for name in reversed(self._files()):
            if (self.run_dir / name).is_file():
                return self.run_dir / name
        return None

    def name_for(self, epoch: int, step: int, epoch_end: bool) -> str:
        name = self.name_format.format(epoch=epoch, step=step)
        if not epoch_end and "{step" not in self.name_format:
            # Mid-epoch files would otherwise take the name of an epoch-end checkpoint.
            stem, dot, suffix = name.partition(".")
            name = f"{stem}-step{step}{dot}{suffix}"
        return name

    def save(self, state: dict, epoch_end: bool) -> Path:
        """Write atomically, record it, then delete what falls beyond the last ``keep``."""
        name = self.name_for(state["epoch"], state["step"], epoch_end)
        path = self.run_dir / name
        _atomic_write(path, lambda f: torch.save(state, f))
        files = [f for f in self._files() if f != name] + [name]
        stale, files = files[:-self.keep], files[-self.keep:]
        _atomic_write(self.run_dir / MANIFEST, lambda f: f.write(json.dumps({"files": files}, indent=1).encode()))
        for old in stale:
            (self.run_dir / old).unlink(missing_ok=True)
        return path


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = {"model", "optimizer", "epoch", "step", "args"} - set(state)
    if missing:
        raise UsageError(f"{path} is not a largebatch checkpoint (missing {', '.join(sorted(missing))})")
    return state


def check_same_run(state: dict, cfg: Config, source: Path) -> None:
    saved = state["args"]
    current = cfg.to_dict()
    differ = [k for k in IDENTITY if k in saved and saved[k] != current[k]
              and not (k == "num_classes" and current[k] is None)]
    if differ:
        what = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {current[k]})" for k in differ)
        raise UsageError(f"{source} belongs to a run with {what}; use a new --log-dir for a new run")
