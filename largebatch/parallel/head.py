"""The classifier's parallelism behind one interface, called unconditionally by the job.

``DenseClassifier`` is the default and does nothing special: the last layer is replicated
and data-parallel like the rest. ``ShardedClassifier`` splits it over the ranks. Both
answer the same questions: how to convert the model, which parameters each rank owns (kept
out of gradient averaging and the start-up broadcast), how the input must be fed, the loss
and its top-k counts, the optimizer's view of norms, and how a checkpoint is gathered and
handed out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..metrics import topk_hits
from .layer import convert_parallel_linear, shards, share_norms
from .lockstep import LockstepInput
from .loss import ParallelCrossEntropyLoss
from .state import broadcast_checkpoint, dense_state


class DenseClassifier:
    def __init__(self, engine, num_classes: int, label_smoothing: float):
        self.engine = engine
        self.criterion: nn.Module = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # A sharded criterion counts its own hits, with the signature of ``topk_hits``.
        self.hits: Callable[..., list[torch.Tensor]] = topk_hits

    def convert(self, model: nn.Module) -> nn.Module:
        return model

    def owned(self, model: nn.Module) -> frozenset[str]:
        return frozenset()

    def input(self, data, image_size: int, device: torch.device):
        return data

    def attach(self, optimizer, model: nn.Module) -> None:
        pass

    def gather_state(self, model: nn.Module, optimizer) -> tuple[dict | None, dict | None]:
        """The model's and optimizer's state dicts on rank 0, ``(None, None)`` elsewhere."""
        if not self.engine.is_main:
            return None, None
        return model.state_dict(), optimizer.state_dict()

    def scatter_state(self, state: dict | None, model: nn.Module, optimizer) -> dict | None:
        """Rank 0's checkpoint (or None) on every rank, ready for ``load_state_dict``."""
        return self.engine.broadcast_object(state, name="checkpoint")


class ShardedClassifier(DenseClassifier):
    """The final ``nn.Linear`` split along ``dim`` (1: classes, 0: input features)."""

    def __init__(self, engine, num_classes: int, label_smoothing: float, dim: int):
        self.engine, self.dim = engine, dim
        self.criterion = criterion = ParallelCrossEntropyLoss(num_classes, engine, label_smoothing=label_smoothing)
        self.hits = criterion.topk_hits

    def convert(self, model):
        return convert_parallel_linear(model, self.dim, self.engine)

    def owned(self, model):
        return frozenset(shards(model))

    def input(self, data, image_size, device):
        # The sharded layer is a collective: no rank may skip a batch.
        return LockstepInput(data, self.engine, image_size, device)

    def attach(self, optimizer, model):
        share_norms(optimizer, model, self.engine)

    def gather_state(self, model, optimizer):
        return dense_state(model, optimizer, self.engine)

    def scatter_state(self, state, model, optimizer):
        return broadcast_checkpoint(state, model, optimizer, self.engine)


def build_classifier(
    engine, num_classes: int, label_smoothing: float, sharded: bool = False, dim: int = 1
) -> DenseClassifier:
    if sharded:
        return ShardedClassifier(engine, num_classes, label_smoothing, dim)
    return DenseClassifier(engine, num_classes, label_smoothing)
