"""The training loop: epochs of optimizer steps of micro-batches, validation, checkpoints.

Everything it uses arrives as an argument (see ``job.py`` for how they are built); it
reads no flags and no globals.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .logs import Throughput
from .metrics import Meter, topk_hits


@dataclass
class Position:
    epoch: int = 0       # epochs completed
    step: int = 0        # optimizer steps completed
    epoch_step: int = 0  # steps completed within `epoch`


def train(cfg, dist, data, model, criterion, optimizer, scheduler, precision, save, console, board, stop,
          profiler, start: Position) -> tuple[str, Position]:
    """Train from ``start`` to ``cfg.epochs``. Returns ("finished", position); ("stopped",
    position) after a stop request (a signal), once a checkpoint is written; or
    ("profiled", position) once --prof's steps are recorded."""
    n_micro = cfg.batches_per_allreduce
    steps_per_epoch = data.batches_per_epoch // n_micro
    pos = Position(start.epoch, start.step, start.epoch_step)
    device = next(model.parameters()).device
    for epoch in range(start.epoch, cfg.epochs):
        model.train()
        meter, speed = Meter(device, getattr(criterion, "topk_hits", topk_hits)), Throughput()
        console.start_epoch(epoch, cfg.epochs, steps_per_epoch, pos.epoch_step)
        batches = data.train(epoch, start_batch=pos.epoch_step * n_micro)
        while pos.epoch_step < steps_per_epoch:
            micro_batches = [next(batches) for _ in range(n_micro)]
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; the schedule moves on after it
            train_step(model, criterion, optimizer, scheduler, precision, micro_batches, meter)
            pos.step, pos.epoch_step = pos.step + 1, pos.epoch_step + 1
            if profiler.step():
                return "profiled", pos
            if pos.epoch_step % cfg.print_freq == 0 or pos.epoch_step == steps_per_epoch:
                report(dist, meter, speed, optimizer, precision, console, board, pos, lr)
                if stop.agreed(dist):
                    save(pos, epoch_end=False)
                    console.end_epoch(f"stopped by {stop.reason} at epoch {epoch + 1} step {pos.epoch_step}; "
                                      f"checkpoint written, resume with --resume auto")
                    return "stopped", pos
            if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0 and pos.epoch_step < steps_per_epoch:
                save(pos, epoch_end=False)
        batches.close()
        dist.average_buffers(model)  # one set of BN statistics for validation and the checkpoint
        val = evaluate(model, criterion, data.val(), precision, dist, device)
        board.scalars(pos.step, {"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"],
                                 "epoch": epoch + 1})
        pos = Position(epoch + 1, pos.step, 0)
        save(pos, epoch_end=True)
        console.end_epoch(f"epoch {epoch + 1}/{cfg.epochs}: val loss {val['loss']:.4f} top1 {val['top1']:.2f} "
                          f"top5 {val['top5']:.2f} ({val['count']} images)")
        if stop.agreed(dist):
            return "stopped", pos
    return "finished", pos


def train_step(model, criterion, optimizer, scheduler, precision, micro_batches, meter: Meter) -> None:
    """One optimizer step over ``len(micro_batches)`` micro-batches.

    Horovod's optimizer allreduces after the last backward pass; the loss is divided by
    the micro-batch count so the step equals one on the concatenated batch. Gradients are
    synchronised, then unscaled, then stepped, so LARS sees true fp32 gradients.
    """
    for images, labels in micro_batches:
        if images is None:
            # Every image of this micro-batch was unreadable; the backward pass still has to
            # run so that Horovod's count of passes stays in step with the other ranks.
            precision.backward(sum(p.sum() * 0.0 for p in model.parameters()))
            continue
        logits = precision.forward(model, images)
        loss = criterion(logits.float(), labels)
        precision.backward(loss / len(micro_batches))
        meter.add(loss, logits, labels)
    optimizer.synchronize()
    if precision.step(optimizer):
        scheduler.step()
    optimizer.zero_grad()


def report(dist, meter, speed, optimizer, precision, console, board, pos: Position, lr: float) -> None:
    stats = meter.reduce(dist, name="train_meter")
    stats["lr"] = lr
    stats["images_per_sec"] = speed.rate(stats.pop("count"))
    console.progress(pos.epoch_step, stats)
    board.scalars(pos.step, {"train/loss": stats["loss"], "train/top1": stats["top1"], "train/lr": stats["lr"],
                             "train/images_per_sec": stats["images_per_sec"], **precision.scalars()})
    board.trust_ratios(pos.step, getattr(optimizer, "last_trust_ratios", None))


@torch.no_grad()
def evaluate(model, criterion, batches, precision, dist, device) -> dict:
    """Loss and top-1/top-5 over every validation image once; rank-summed, so it equals a
    single-process evaluation."""
    model.eval()
    meter = Meter(device, getattr(criterion, "topk_hits", topk_hits))
    for images, labels in batches:
        if images is None:
            continue
        logits = precision.forward(model, images)
        meter.add(criterion(logits.float(), labels), logits, labels)
    return meter.reduce(dist, name="val_meter")
