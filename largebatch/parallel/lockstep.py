"""Input for a sharded classifier: every rank takes part in every batch."""

from __future__ import annotations

import torch


class LockstepInput:
    """Wraps an input object (same interface) so that every rank runs every validation batch:
    the sharded head is a collective, so a rank cannot skip one. A batch with no readable
    image becomes an empty one (zero rows), and validation goes on with empty batches on
    ranks that have run out until every rank has (their shares may differ by a batch)."""

    def __init__(self, data, engine, image_size: int, device: torch.device):
        self.data, self.engine, self.device = data, engine, device
        self.num_classes = data.num_classes
        self.batches_per_epoch = data.batches_per_epoch
        self.empty_shape = (0, 3, image_size, image_size)

    @property
    def bad_files(self) -> set[str]:
        return self.data.bad_files

    def _empty(self, like):
        images, labels = like if like is not None else (None, None)
        if images is None:  # none seen yet: the shape every input produces
            return (
                torch.zeros(self.empty_shape, device=self.device),
                torch.zeros(0, dtype=torch.long, device=self.device),
            )
        return images[:0], labels[:0]

    def train(self, epoch: int, start_batch: int = 0):
        # Every rank already runs every training micro-batch: the loop (train.SmallBatches).
        return self.data.train(epoch, start_batch=start_batch)

    def val(self):
        batches, last = iter(self.data.val()), None
        try:
            while True:
                item = next(batches, None)
                more = self.engine.allreduce_max(torch.tensor([0 if item is None else 1]), name="mp.val.more")
                if not int(more):
                    return
                if item is None or item[0] is None:
                    item = self._empty(last)
                else:
                    last = item
                yield item
        finally:
            getattr(batches, "close", lambda: None)()
