"""The training state: everything a checkpoint holds, defined once.

``TrainState.state_dict()`` is the checkpoint and ``load_state_dict()`` its inverse; nothing
else builds or takes apart a checkpoint dict. Its keys:

    model, optimizer   dense layout, also for a sharded classifier (rank 0 gathers it)
    scheduler, scaler  the schedule's position, the loss scale and skipped-step count
    epoch              epochs completed
    step               optimizer steps completed
    epoch_step         steps completed within ``epoch`` (the data order's position)
    rng                each rank's torch RNG state
    rank_buffers       each rank's batch-norm running statistics, which differ between
                       the epoch-end averagings (exact mid-epoch resume needs them)
    world_size, engine, args, version
    seconds            training time so far, over every job of the run (time to accuracy)
    reached            {"epoch", "top1", "seconds"} once a validation reached --target-top1
    ema                the weights' moving average (--model-ema; dense layout), or None

Only plain types and tensors go in, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LRScheduler

from .ema import NoEma

if TYPE_CHECKING:
    from .engines import Engine, Gradients
    from .parallel import DenseClassifier
    from .precision import Precision

VERSION = 1


@dataclass
class Position:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    epoch_step: int = 0  # steps completed within `epoch`


@dataclass
class TrainState:
    engine: Engine
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    precision: Precision
    classifier: DenseClassifier  # or its subclass ShardedClassifier
    gradients: Gradients  # how this step's gradients are averaged
    args: dict = field(default_factory=dict)
    position: Position = field(default_factory=Position)
    ema: NoEma = field(default_factory=NoEma)  # --model-ema: ModelEma
    reached: dict | None = None  # the validation that reached --target-top1
    _seconds_before: float = 0.0  # training time of the run's earlier jobs
    _since: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        """Training time of the run so far, this job's since it started training included."""
        return self._seconds_before + time.monotonic() - self._since

    @property
    def criterion(self) -> torch.nn.Module:
        return self.classifier.criterion

    def state_dict(self) -> dict | None:
        """The checkpoint, on rank 0; None on the others. A collective: every rank calls it."""
        engine = self.engine
        rng = engine.allgather_object(torch.get_rng_state(), name="rng")
        buffers = engine.allgather_object(
            {k: v.cpu() for k, v in self.model.named_buffers() if v.is_floating_point()}, name="buffers"
        )
        model_state, optimizer_state = self.classifier.gather_state(self.model, self.optimizer)
        ema_state = self.ema.gather(self.classifier, self.optimizer)
        if not engine.is_main:
            return None
        pos = self.position
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.state_dict(),
            "epoch": pos.epoch,
            "step": pos.step,
            "epoch_step": pos.epoch_step,
            "rng": rng,
            "rank_buffers": buffers,
            "world_size": engine.size,
            "engine": engine.name,
            "args": self.args,
            "version": VERSION,
            "seconds": self.seconds,
            "reached": self.reached,
            "ema": ema_state,
        }

    def load_state_dict(self, state: dict) -> None:
        """This rank's part of a checkpoint (its slice of a sharded classifier). RNG and
        batch-norm buffers are per rank, so they are restored only at the same world size."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler"))
        rank, size = self.engine.rank, self.engine.size
        if state.get("world_size") == size and state.get("rng"):
            torch.set_rng_state(state["rng"][rank])
            own = dict(self.model.named_buffers())
            for name, value in state.get("rank_buffers", [{}] * size)[rank].items():
                own[name].copy_(value)
        self.position = Position(state["epoch"], state["step"], state.get("epoch_step", 0))
        self.reached = state.get("reached")
        self._seconds_before, self._since = float(state.get("seconds", 0.0)), time.monotonic()

    def start(self, checkpoint: dict | None) -> None:
        """Every rank from rank 0's ``checkpoint`` (None elsewhere), or, without one, from
        rank 0's initial weights. A collective."""
        # The average goes out slice by slice on its own, not whole with the rest.
        saved_ema = checkpoint.pop("ema", None) if checkpoint is not None else None
        state = self.classifier.scatter_state(checkpoint, self.model, self.optimizer)
        if state is None:
            self.engine.broadcast_model(self.model, exclude=self.classifier.owned(self.model))
            self.position = Position()
            self._since = time.monotonic()
        else:
            self.load_state_dict(state)
        self.ema.load(saved_ema, self.classifier, self.model, self.optimizer)
