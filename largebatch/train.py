"""The training loop: epochs of optimizer steps of micro-batches, validation, checkpoints.

Everything it uses arrives as an argument (see ``job.py`` for how it is built): the
training state, the input, the config and the hooks to the outside world. It reads no
globals and asks no engine- or feature-specific questions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from . import batchnorm
from .logs import Throughput
from .metrics import Meter
from .model import has_batchnorm
from .state import TrainState

if TYPE_CHECKING:
    from .config import Config
    from .data import Batch, Input
    from .logs import Board, Console
    from .profiling import StepProfiler
    from .stop import StopRequest


@dataclass
class Hooks:
    """What the loop reports to and listens to."""

    console: Console
    board: Board  # TensorBoard
    stop: StopRequest
    profiler: StepProfiler
    save: Callable[[TrainState, bool], None]  # save(state, epoch_end): a collective


def train(state: TrainState, data: Input, cfg: Config, hooks: Hooks) -> str:
    """Train from ``state.position`` to ``cfg.schedule.epochs``. Returns "finished"; "stopped" after a
    stop request (a signal), once a checkpoint is written; "profiled" once --prof's steps are
    recorded; "diverged" when more than --max-nonfinite-steps steps had a non-finite loss;
    "unreadable" when an epoch trained on less than half the images it read; or "target" once a
    validation reached --target-top1 (its epoch's checkpoint written).
    ``state.position`` tells where it ended."""
    n_micro = cfg.schedule.batches_per_allreduce
    steps_per_epoch = data.batches_per_epoch // n_micro
    engine, pos, console = state.engine, state.position, hooks.console
    images_per_step = cfg.schedule.batch_size * n_micro * engine.size
    nonfinite_steps = 0
    device = next(state.model.parameters()).device
    too_small = SmallBatches(2 if has_batchnorm(state.model) else 1, cfg.data.image_size, device)
    bn_statistics = batchnorm.statistics(cfg, engine.size)
    target = cfg.validation.target_top1
    for epoch in range(pos.epoch, cfg.schedule.epochs):
        state.model.train()
        meter, speed = Meter(device, state.classifier.hits), Throughput()
        console.start_epoch(epoch, cfg.schedule.epochs, steps_per_epoch, pos.epoch_step)
        batches = too_small.skipped(data.train(epoch, start_batch=pos.epoch_step * n_micro))
        images = Images(expected=(steps_per_epoch - pos.epoch_step) * images_per_step)
        while pos.epoch_step < steps_per_epoch:
            micro_batches = [next(batches) for _ in range(n_micro)]
            lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses; the schedule moves on after it
            train_step(state, micro_batches, meter)
            pos.step, pos.epoch_step = pos.step + 1, pos.epoch_step + 1
            state.ema.update(state.model, pos.step)
            if hooks.profiler.step():
                return "profiled"
            if pos.epoch_step % cfg.run.print_freq == 0 or pos.epoch_step == steps_per_epoch:
                stats = report(state, meter, speed, hooks, lr)
                nonfinite_steps += stats["nonfinite_steps"]
                images.trained += stats["count"]
                if nonfinite_steps > cfg.run.max_nonfinite_steps:
                    console.diverged(nonfinite_steps, pos.step, cfg.run.max_nonfinite_steps)
                    return "diverged"
                if hooks.stop.agreed(engine):
                    hooks.save(state, False)
                    console.stopped(hooks.stop.reason, epoch, pos.epoch_step)
                    return "stopped"
            if (
                cfg.run.checkpoint_every
                and pos.step % cfg.run.checkpoint_every == 0
                and pos.epoch_step < steps_per_epoch
            ):
                hooks.save(state, False)
        batches.close()
        if images.starved():  # such an epoch is neither validated nor saved
            console.starved(epoch, images.trained, images.expected)
            return "unreadable"
        validating = (epoch + 1) % cfg.validation.eval_every == 0 or epoch + 1 == cfg.schedule.epochs
        # One set of BN statistics for validation and the checkpoint (re-estimated with --precise-bn).
        training_batches = partial(_skipped, too_small, data.train, epoch)
        notes = bn_statistics.settle(state, training_batches, validating)
        val = ema_val = None
        if validating:
            val = evaluate(state, data.val())
            ema_val = state.ema.validate(
                state, bn_statistics, training_batches, lambda m: evaluate(state, data.val(), m)
            )
        pos.epoch, pos.epoch_step = epoch + 1, 0
        scalars = {"epoch": epoch + 1, **notes}
        for prefix, result in (("val", val), ("val_ema", ema_val)):
            if result is not None:
                scalars.update({f"{prefix}/{k}": result[k] for k in ("loss", "top1", "top5")})
        if val is not None and target is not None and val["top1"] >= target:
            state.reached = {"epoch": epoch + 1, "top1": val["top1"], "seconds": state.seconds}
            scalars["val/seconds_to_target"] = state.reached["seconds"]
        hooks.board.scalars(pos.step, scalars)  # before the save, which flushes them with the checkpoint
        hooks.save(state, True)
        console.end_of_epoch(epoch, cfg.schedule.epochs, val, notes, ema_val)
        if state.reached is not None:
            console.reached(target, state.reached)
            return "target"
        if hooks.stop.agreed(engine):  # a signal during validation or the epoch's checkpoint
            console.stopped(hooks.stop.reason, epoch, None)
            return "stopped"
    return "finished"


def _skipped(too_small: SmallBatches, train: Callable[[int], Iterator[Batch]], epoch: int) -> Iterator[Batch]:
    return too_small.skipped(train(epoch))


@dataclass
class Images:
    """An epoch's images: how many its steps read, how many trained (readable, in batches
    big enough), summed over the ranks from the reports' meters (no collective of its own)."""

    expected: int
    trained: int = 0

    def starved(self) -> bool:
        return self.trained * 2 < self.expected


class SmallBatches:
    """Every rank takes part in every micro-batch: DDP reduces only after a forward pass
    through it, and a sharded classifier is a collective. A micro-batch with no readable
    image, ``(None, None)``, or one that unreadable files shrank below ``min_images`` (batch
    norm in training mode cannot normalise a single image) becomes an empty one: zero rows,
    which pass forward and backward without moving batch-norm statistics. One warning per
    rank, the first time one is shrunk."""

    def __init__(self, min_images: int, image_size: int, device: torch.device):
        self.min_images, self.count = min_images, 0
        self.empty = (
            torch.zeros((0, 3, image_size, image_size), device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )

    def skipped(self, batches: Iterable[Batch]) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        try:
            for images, labels in batches:
                if images is not None and 0 < len(images) < self.min_images:
                    self.count += 1
                    if self.count == 1:
                        print(
                            f"warning: skipping a micro-batch left with {len(images)} readable image(s): batch norm "
                            f"needs at least {self.min_images}; further ones are skipped without a warning",
                            file=sys.stderr,
                            flush=True,
                        )
                    images = None
                if images is None or labels is None:
                    yield self.empty
                    continue
                if self.empty[0].dtype != images.dtype or self.empty[0].device != images.device:
                    # the input's own dtype and device; a fresh empty tensor, not a view, which
                    # would keep this whole batch alive
                    self.empty = images.new_empty((0, *images.shape[1:])), labels.new_empty(0)
                yield images, labels
        finally:
            close = getattr(batches, "close", None)  # end the input's loader with this generator
            if close is not None:
                close()


def train_step(state: TrainState, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], meter: Meter) -> None:
    """One optimizer step over ``len(micro_batches)`` micro-batches.

    The loss is divided by the micro-batch count so the step equals one on the
    concatenated batch. Gradients are averaged across ranks, then unscaled, then stepped,
    so LARS sees true fp32 gradients.
    """
    precision, gradients = state.precision, state.gradients
    nonfinite = torch.zeros((), device=meter.sums.device)
    for i, (images, labels) in enumerate(micro_batches):
        with gradients.backward(last=i == len(micro_batches) - 1):
            logits = precision.forward(gradients.module, images)
            if len(labels) == 0:  # nothing readable here (SmallBatches): take part with zero gradients
                precision.backward(logits.float().sum() * 0.0)
                continue
            loss = state.criterion(logits.float(), labels)
            precision.backward(loss / len(micro_batches))
            meter.add(loss, logits, labels)
            nonfinite += ~torch.isfinite(loss.detach())
    gradients.reduce()
    stepped = precision.step(state.optimizer, gradients.step)
    if stepped:
        state.scheduler.step()
    meter.add_step(nonfinite.clamp(max=1) if stepped else torch.zeros_like(nonfinite))
    state.optimizer.zero_grad()


def report(state: TrainState, meter: Meter, speed: Throughput, hooks: Hooks, lr: float) -> dict:
    """Log the meter's averages since the last report; returns the meter's reduction (with
    ``count``, the images trained on, and ``nonfinite_steps``, both over all ranks)."""
    stats = meter.reduce(state.engine, name="train_meter")
    shown = {
        "loss": stats["loss"],
        "top1": stats["top1"],
        "top5": stats["top5"],
        "lr": lr,
        "images_per_sec": speed.rate(stats["count"]),
    }
    step = state.position.step
    hooks.console.progress(state.position.epoch_step, shown)
    hooks.board.scalars(
        step,
        {
            "train/loss": shown["loss"],
            "train/top1": shown["top1"],
            "train/lr": lr,
            "train/images_per_sec": shown["images_per_sec"],
            **state.precision.scalars(),
        },
    )
    hooks.board.trust_ratios(step, getattr(state.optimizer, "last_trust_ratios", None))
    return stats


@torch.no_grad()
def evaluate(state: TrainState, batches: Iterable[Batch], model: torch.nn.Module | None = None) -> dict:
    """Loss and top-1/top-5 over every validation image once; rank-summed, so it equals a
    single-process evaluation. ``model``: other weights than ``state.model`` (their average)."""
    model = state.model if model is None else model
    model.eval()
    meter = Meter(next(model.parameters()).device, state.classifier.hits)
    for images, labels in batches:
        if images is None or labels is None:
            continue
        logits = state.precision.forward(model, images)
        meter.add(state.criterion(logits.float(), labels), logits, labels)
    return meter.reduce(state.engine, name="val_meter")
