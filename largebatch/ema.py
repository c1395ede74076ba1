"""--model-ema DECAY: an exponential moving average of the weights, validated beside them.

The decay is given per 256 training images, and each update applies it once for every 256
images the optimizer steps since the last update took: an update every K steps of a global
batch B decays by ``DECAY ** (B * K / 256)``. The average's horizon in images,
``256 / (1 - DECAY)``, is then the same at any global batch and any K, so one DECAY serves a
recipe on 8 GPUs or 256. (torchvision's reference scales ``1 - decay`` linearly by the batch,
which matches this to first order; timm's decay is per step.)

What is averaged: the parameters, in their own dtype (the fp32 masters under O2), on the
training device, every K steps. The parameters are the same on every rank after each step,
so every rank holds the same average and rank 0's is the checkpoint's, under ``ema``. Batch
norm's running statistics are not averaged: before each validation the average takes the
training model's (averaged across ranks), or, with --precise-bn, statistics re-estimated
with its own weights over the same images. A sharded classifier is averaged slice by slice
and saved whole, like the model.

``NoEma`` is the stand-in when --model-ema is off: every call a no-op, so nothing else asks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .batchnorm import BatchNormStatistics
    from .data import Batch
    from .parallel import DenseClassifier
    from .precision import Precision
    from .state import TrainState

IMAGES_PER_DECAY = 256


def decay_per_update(decay: float, global_batch: int, every: int) -> float:
    """The decay one update applies: ``decay`` per 256 images, for ``global_batch * every`` images."""
    return decay ** (global_batch * every / IMAGES_PER_DECAY)


class NoEma:
    """--model-ema off."""

    module: nn.Module | None = None

    def update(self, model: nn.Module, step: int) -> None:
        pass

    def gather(self, classifier: DenseClassifier, optimizer: torch.optim.Optimizer) -> dict | None:
        return None

    def load(self, saved: dict | None, classifier: DenseClassifier, model: nn.Module, optimizer) -> None:
        pass

    def validate(
        self,
        state: TrainState,
        statistics: BatchNormStatistics,
        batches: Callable[[], Iterator[Batch]],
        evaluate: Callable[[nn.Module], dict],
    ) -> dict | None:
        return None


class ModelEma(NoEma):
    def __init__(self, model: nn.Module, decay: float, every: int, precision: Precision):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.every = decay, every
        precision.track_copy(model, self.module)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (counted from 1): every ``every`` steps, move the
        average towards the weights."""
        if step % self.every == 0:
            assert self.module is not None
            averages = [p.detach() for p in self.module.parameters()]
            weights = [p.detach() for p in model.parameters()]
            torch._foreach_lerp_(averages, weights, 1.0 - self.decay)

    def gather(self, classifier: DenseClassifier, optimizer: torch.optim.Optimizer) -> dict | None:
        """The average's state dict, dense, on rank 0 (None elsewhere). A collective."""
        assert self.module is not None
        return classifier.gather_state(self.module, optimizer)[0]

    def load(self, saved: dict | None, classifier: DenseClassifier, model: nn.Module, optimizer) -> None:
        """Rank 0's saved average (None elsewhere; None on rank 0 too: a run that had none
        starts it from the weights), each rank taking its slices. A collective."""
        assert self.module is not None
        empty_optimizer: dict = {"state": {}, "param_groups": []}
        own = classifier.scatter_state(
            {"model": saved, "optimizer": empty_optimizer} if saved is not None else None, model, optimizer
        )
        self.module.load_state_dict(own["model"] if own is not None else model.state_dict())

    def validate(
        self,
        state: TrainState,
        statistics: BatchNormStatistics,
        batches: Callable[[], Iterator[Batch]],
        evaluate: Callable[[nn.Module], dict],
    ) -> dict | None:
        """Its loss and top-k on the validation images, after giving it batch norm statistics."""
        assert self.module is not None
        statistics.settle_average(state, self.module, batches)
        return evaluate(self.module)


def model_ema(model: nn.Module, decay: float, every: int, global_batch: int, precision: Precision) -> NoEma | ModelEma:
    if not decay:
        return NoEma()
    return ModelEma(model, decay_per_update(decay, global_batch, every), every, precision)
