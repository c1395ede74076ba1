"""Batch norm for large batches: what a run does to its batch-norm layers besides training them.

    zero_init_residual(model, name)        --zero-init-residual: the last BN weight of every
                                           residual block starts at 0 (Goyal et al., 2017)
    convert_ghost_batchnorm(model, size)   --ghost-bn G: statistics over virtual batches of G
                                           images (Hoffer et al., 2017)
    statistics(cfg) -> BatchNormStatistics what a run does to the running statistics before
                                           each validation (the loop's one call)

Ghost batch norm. In training, a micro-batch of n images is normalised in ``ceil(n / G)``
near-equal chunks (``Tensor.tensor_split``), each by its own mean and variance, and each
chunk moves the running statistics as a batch of its own would: exactly batch norm applied
chunk by chunk. In evaluation it is batch norm. The layer keeps batch norm's parameters and
buffers under the same names, so a checkpoint loads into a plain torchvision model.

Running statistics before validation. Each rank's running averages come from its own
batches; by default they are averaged across ranks (the engine's ``average_buffers``), so
every rank validates one model and the checkpoint holds what it validated. With
``--precise-bn N`` they are first re-estimated with the current weights over N training
images (split across the ranks), as the plain mean over batches of each batch's statistics,
not an exponential average dominated by the last few batches of a long run with slowly
changing weights (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021; fvcore's
``update_bn_stats`` does the same). At large batches an epoch is few steps, so the running
averages never settle; the convergence study showed it (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .argparsing import UsageError

if TYPE_CHECKING:
    from .config import Config
    from .data import Batch
    from .state import TrainState

_BN = nn.modules.batchnorm._BatchNorm


# --- zero-initialised residuals --------------------------------------------------------------------


def zero_init_residual(model: nn.Module, name: str) -> int:
    """Zero the weight (gamma) of the last batch norm of every residual block: each block then
    starts as the identity. Returns how many; UsageError for a model without such blocks."""
    lasts = [
        m.bn3 if isinstance(m, Bottleneck) else m.bn2
        for m in model.modules()
        if isinstance(m, (BasicBlock, Bottleneck))
    ]
    if not lasts:
        raise UsageError(
            f"--zero-init-residual: {name} has no residual blocks (torchvision's ResNet BasicBlock or Bottleneck, as "
            f"in resnet*, resnext*, wide_resnet* and cifar_resnet*)"
        )
    for bn in lasts:
        nn.init.zeros_(bn.weight)
    return len(lasts)


# --- ghost batch norm ----------------------------------------------------------------------------


class GhostBatchNorm(_BN):
    """Batch norm over chunks of at most ``ghost_size`` images in training; see the module doc."""

    def __init__(self, num_features: int, ghost_size: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.ghost_size = ghost_size

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or input.size(0) <= self.ghost_size:
            return super().forward(input)
        chunks = input.tensor_split(math.ceil(input.size(0) / self.ghost_size))
        return torch.cat([super(GhostBatchNorm, self).forward(c) for c in chunks])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"


def convert_ghost_batchnorm(module: nn.Module, ghost_size: int) -> nn.Module:
    """``module`` with every batch norm layer (not SyncBatchNorm) replaced by a GhostBatchNorm
    holding the same parameters and buffers, as ``SyncBatchNorm.convert_sync_batchnorm`` does."""
    if isinstance(module, _BN) and not isinstance(module, nn.SyncBatchNorm):
        ghost = GhostBatchNorm(
            module.num_features,
            ghost_size,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        ghost.load_state_dict(module.state_dict())
        ghost.train(module.training)
        return ghost
    for name, child in module.named_children():
        module.add_module(name, convert_ghost_batchnorm(child, ghost_size))
    return module


# --- the running statistics before validation ----------------------------------------------------------


class BatchNormStatistics:
    """At each epoch's end: the running statistics averaged across the ranks."""

    def settle(self, state: TrainState, batches: Callable[[], Iterator[Batch]], validating: bool) -> dict:
        """Make the statistics the validation (if ``validating``) and the checkpoint use;
        ``batches()`` opens this rank's training batches. Returns scalars to log."""
        state.engine.average_buffers(state.model)
        return {}

    def settle_average(self, state: TrainState, module: nn.Module, batches: Callable[[], Iterator[Batch]]) -> None:
        """Statistics for ``module``, the weights' average, before its validation: the
        training model's, just settled."""
        with torch.no_grad():
            for own, trained in zip(module.buffers(), state.model.buffers()):
                own.copy_(trained)


class PreciseBatchNorm(BatchNormStatistics):
    """--precise-bn N: before each validation, re-estimated over ``num_batches`` training
    batches a rank (N images over all), then averaged across the ranks."""

    def __init__(self, num_batches: int):
        self.num_batches = num_batches

    def settle(self, state: TrainState, batches: Callable[[], Iterator[Batch]], validating: bool) -> dict:
        if not validating:
            return super().settle(state, batches, validating)
        started = time.perf_counter()
        used = self._recompute(state, state.model, batches)
        super().settle(state, batches, validating)
        images = state.engine.allreduce_sum(torch.tensor([float(used)]), name="precise_bn_images").item()
        return {"precise_bn/images": images, "precise_bn/seconds": time.perf_counter() - started}

    def settle_average(self, state: TrainState, module: nn.Module, batches: Callable[[], Iterator[Batch]]) -> None:
        """The average's own statistics, re-estimated with its weights over the same images."""
        self._recompute(state, module, batches)
        state.engine.average_buffers(module)

    def _recompute(self, state: TrainState, model: nn.Module, batches: Callable[[], Iterator[Batch]]) -> int:
        opened = batches()
        try:
            return recompute(state, opened, self.num_batches, model)
        finally:
            close = getattr(opened, "close", None)  # ends the loader's workers
            if close is not None:
                close()


@torch.no_grad()
def recompute(state: TrainState, batches: Iterable[Batch], num_batches: int, model: nn.Module | None = None) -> int:
    """Set every batch norm layer's running mean and variance to the mean, over the first
    ``num_batches`` batches of ``batches``, of each batch's own statistics under the current
    weights; returns the images used. Each batch is a forward pass, an empty one (no readable
    image) too, so every rank runs the same number (layers that synchronise, SyncBatchNorm,
    stay in step); an empty one adds nothing to the averages. ``model``: another than
    ``state.model`` (the weights' average), run with the same precision."""
    model = state.model if model is None else model
    layers = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not layers:
        return 0
    running = [_running(m) for m in layers]
    momenta = [m.momentum for m in layers]
    sums = [(torch.zeros_like(mean), torch.zeros_like(var)) for mean, var in running]
    was_training = model.training
    model.train()
    for m in layers:
        m.momentum = 1.0  # after a forward pass the running statistics are that batch's own
    used = count = 0
    try:
        for read, (images, _labels) in enumerate(batches):
            if read == num_batches:
                break
            if images is None:
                continue
            state.precision.forward(model, images)
            if len(images) == 0:
                continue
            for (mean, var), (total_mean, total_var) in zip(running, sums):
                total_mean += mean
                total_var += var
            used, count = used + len(images), count + 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    if count:
        for (mean, var), (total_mean, total_var) in zip(running, sums):
            mean.copy_(total_mean / count)
            var.copy_(total_var / count)
    return used


def _running(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = layer.running_mean, layer.running_var
    assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)  # track_running_stats
    return mean, var


def statistics(cfg: Config, world_size: int) -> BatchNormStatistics:
    """What the run does to the running statistics at each epoch's end."""
    if cfg.norm.precise_bn:
        per_rank = math.ceil(cfg.norm.precise_bn / world_size)
        return PreciseBatchNorm(max(1, math.ceil(per_rank / cfg.schedule.batch_size)))
    return BatchNormStatistics()
