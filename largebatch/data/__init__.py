"""Input pipelines: folder (torchvision), dali, synthetic; tfrecord writes DALI's input.

Every input is an ``Input``. Each rank's ``train(epoch)`` yields the same number of
micro-batches (``batches_per_epoch``), so no rank waits for another in a collective; a
micro-batch whose every image was unreadable is ``(None, None)``, and the loop still runs
it, as an empty batch, so that every rank takes part in every reduction. ``val()`` yields
each validation image exactly once over all ranks; shares may differ by a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

Batch = tuple[torch.Tensor | None, torch.Tensor | None]  # (images, labels), or (None, None)


class Input(Protocol):
    num_classes: int
    batches_per_epoch: int  # micro-batches per rank per epoch, equal on every rank
    bad_files: set[str]  # unreadable files met so far on this rank

    def train(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's micro-batches of ``epoch`` from ``start_batch`` on (a resumed run)."""

    def val(self) -> Iterable[Batch]:
        """This rank's share of the validation images."""
