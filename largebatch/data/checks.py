"""Checks every input makes of its data, worded once."""

from __future__ import annotations

from ..argparsing import UsageError


class DataError(UsageError):
    """Bad data met by this rank alone while it reads (an unreadable image, a corrupt record,
    a transform that fails): one line naming the file, said by the rank that met it, exit 2."""


def printable(text: str) -> str:
    """``text`` on one line: a newline or other control character in a file name is
    written as its escape, so one warning stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def same_classes(train: list[str], val: list[str], train_name: str, val_name: str) -> None:
    """Validation must have exactly the training classes: label i must mean one class."""
    if train != val:
        only_train = sorted(set(train) - set(val))[:3]
        only_val = sorted(set(val) - set(train))[:3]
        raise UsageError(
            f"{val_name} classes differ from {train_name} classes "
            f"(only in train: {only_train or '-'}, only in val: {only_val or '-'})"
        )


def batches_per_epoch(cfg, size: int, n_train: int, source: str) -> int:
    """Each rank's micro-batches per epoch; at least one optimizer step's worth, or refused."""
    batches = (n_train // size) // cfg.schedule.batch_size
    if batches < cfg.schedule.batches_per_allreduce:
        needed = cfg.schedule.batch_size * cfg.schedule.batches_per_allreduce * size
        raise UsageError(
            f"--batch-size {cfg.schedule.batch_size} x --batches-per-allreduce "
            f"{cfg.schedule.batches_per_allreduce} x {size} processes needs {needed} training images; "
            f"{source} has {n_train}"
        )
    return batches
