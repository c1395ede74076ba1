r"""Per-step learning-rate schedules with linear warmup for large-batch training.

This file depends only on PyTorch and the standard library so that it can be
copied on its own into other code bases.

All schedulers here are :class:`torch.optim.lr_scheduler.LRScheduler`
subclasses stepped **once per optimizer step** (not per epoch)::

    scheduler = PolynomialWarmup(optimizer, decay_steps=total_steps,
                                 warmup_steps=warmup_steps)
    for batch in loader:
        ...
        optimizer.step()
        scheduler.step()

After construction every param group's ``lr`` is the rate for optimizer step
0, and each ``scheduler.step()`` moves to the next step. Each param group is
scheduled from its own base rate :math:`b` (its ``lr`` when the scheduler was
created). With :math:`W` warmup steps, :math:`D` decay steps (counted from
step 0, warmup included) and final rate :math:`e`, the rate at step
:math:`s` is

.. math::

    \text{warmup } (s < W):\quad
        lr(s) = b \, \frac{s + 1}{W}

so the first step is not taken at rate 0 and step :math:`W - 1` reaches
:math:`b`. After warmup, with :math:`p = \min(s - W, D - W) / (D - W)`:

.. math::

    \text{PolynomialWarmup:}\quad lr(s) &= (b - e)(1 - p)^{\text{power}} + e \\
    \text{CosineWarmup:}\quad lr(s) &= e + \tfrac12 (b - e)(1 + \cos \pi p) \\
    \text{MultiStepWarmup:}\quad lr(s) &=
        b \, \gamma^{\lvert\{m \in \text{milestones} : m \le s\}\rvert}

Polynomial and cosine schedules stay at :math:`e` from step :math:`D` on.

Every rate is a closed-form function of the step index
(``last_epoch``), never of the previous rate, so a scheduler restored with
``load_state_dict`` continues with exactly the same rates as an
uninterrupted run.
"""

import bisect
import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PolynomialWarmup", "CosineWarmup", "MultiStepWarmup"]


def _as_step_count(name: str, value) -> int:
    """``value`` as a non-negative int; integral floats (``5.0 * steps``) pass."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer number of steps, got {value!r}") from None
    if not as_float.is_integer():
        raise ValueError(f"{name} must be an integer number of steps, got {value!r}")
    if as_float < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(as_float)


class _WarmupScheduler(LRScheduler):
    """Linear warmup over ``warmup_steps``, then :meth:`_decayed_lr`.

    Subclasses set their own attributes *before* calling ``__init__`` here,
    because ``LRScheduler.__init__`` already evaluates the rate for step 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, last_epoch: int = -1):
        self.warmup_steps = _as_step_count("warmup_steps", warmup_steps)
        super().__init__(optimizer, last_epoch)

    # A param group's lr may be a tensor (PyTorch allows it); the rates keep its type.
    def _lr_at(self, step: int, base_lr: float | torch.Tensor) -> float | torch.Tensor:
        """The learning rate of optimizer step ``step`` for base rate ``base_lr``."""
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        return self._decayed_lr(step, base_lr)

    def _decayed_lr(self, step: int, base_lr: float | torch.Tensor) -> float | torch.Tensor:
        raise NotImplementedError

    def get_lr(self) -> list[float | torch.Tensor]:
        return [self._lr_at(self.last_epoch, base_lr) for base_lr in self.base_lrs]

    # LRScheduler.step(epoch) (deprecated) prefers this when present; every
    # rate here is closed-form already.
    _get_closed_form_lr = get_lr


class _DecayToEndScheduler(_WarmupScheduler):
    """Shared arguments of schedules that decay to ``end_lr`` at ``decay_steps``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_steps: int,
        warmup_steps: int = 0,
        end_lr: float = 0.0,
        last_epoch: int = -1,
    ):
        decay_steps = _as_step_count("decay_steps", decay_steps)
        warmup = _as_step_count("warmup_steps", warmup_steps)
        if decay_steps <= warmup:
            raise ValueError(
                f"decay_steps ({decay_steps}) must be greater than warmup_steps ({warmup}): "
                "decay_steps counts from step 0, warmup included"
            )
        if end_lr < 0:
            raise ValueError(f"end_lr must be >= 0, got {end_lr}")
        self.decay_steps = decay_steps
        self.end_lr = end_lr
        super().__init__(optimizer, warmup, last_epoch)

    def _decay_progress(self, step: int) -> float:
        """Fraction of the post-warmup decay done at ``step``, clamped to 1."""
        span = self.decay_steps - self.warmup_steps
        return min(step - self.warmup_steps, span) / span


class PolynomialWarmup(_DecayToEndScheduler):
    """Linear warmup, then polynomial decay from the base rate to ``end_lr``.

    Args:
        optimizer: wrapped optimizer.
        decay_steps: step at which ``end_lr`` is reached, counted from step 0
            (warmup included); must exceed ``warmup_steps``.
        warmup_steps: number of linear warmup steps.
        end_lr: final learning rate, shared by all param groups.
        power: exponent of the decay; the default 2 is the schedule of the
            LARS (MLPerf ResNet-50) reference.
        last_epoch: index of the last optimizer step taken, for resuming.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_steps: int,
        warmup_steps: int = 0,
        end_lr: float = 0.0,
        power: float = 2.0,
        last_epoch: int = -1,
    ):
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.power = power
        super().__init__(optimizer, decay_steps, warmup_steps, end_lr, last_epoch)

    def _decayed_lr(self, step: int, base_lr: float | torch.Tensor) -> float | torch.Tensor:
        remaining = 1.0 - self._decay_progress(step)
        return (base_lr - self.end_lr) * remaining**self.power + self.end_lr


class CosineWarmup(_DecayToEndScheduler):
    """Linear warmup, then half a cosine from the base rate to ``end_lr``.

    Args:
        optimizer: wrapped optimizer.
        decay_steps: step at which ``end_lr`` is reached, counted from step 0
            (warmup included); must exceed ``warmup_steps``.
        warmup_steps: number of linear warmup steps.
        end_lr: final learning rate, shared by all param groups.
        last_epoch: index of the last optimizer step taken, for resuming.
    """

    def _decayed_lr(self, step: int, base_lr: float | torch.Tensor) -> float | torch.Tensor:
        cosine = 0.5 * (1.0 + math.cos(math.pi * self._decay_progress(step)))
        return self.end_lr + (base_lr - self.end_lr) * cosine


class MultiStepWarmup(_WarmupScheduler):
    """Linear warmup, then the base rate times ``gamma`` per milestone passed.

    Milestones are optimizer steps counted from step 0. A milestone that falls
    inside the warmup takes effect as soon as the warmup ends; a milestone
    listed twice applies ``gamma`` twice (as in ``MultiStepLR``).

    Args:
        optimizer: wrapped optimizer.
        milestones: steps at which the rate is multiplied by ``gamma``.
        gamma: multiplicative factor per milestone.
        warmup_steps: number of linear warmup steps.
        last_epoch: index of the last optimizer step taken, for resuming.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Iterable[int],
        gamma: float = 0.1,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ):
        milestones = sorted(_as_step_count("milestone", m) for m in milestones)
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.milestones = milestones
        self.gamma = gamma
        super().__init__(optimizer, warmup_steps, last_epoch)

    def _decayed_lr(self, step: int, base_lr: float | torch.Tensor) -> float | torch.Tensor:
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, step)
