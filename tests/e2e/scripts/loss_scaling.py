"""Under mpirun -np 2 (checks.py loss_scaling), built by the job's factory and stepped by its own train_step:
1. an overflow on one rank (O1, dynamic scale) skips exactly that step on every rank:
   weights, LARS momentum and the schedule are untouched, the scale halves, the skip is counted;
2. LARS sees unscaled gradients: the same step at two loss scales gives the same update."""

import torch
from script import emit

from largebatch.config import parse_config
from largebatch.job import build_state
from largebatch.metrics import Meter
from largebatch.precision import Policy, Precision
from largebatch.train import train_step

CPU = torch.device("cpu")


def setup(engine, flags, precision=None):
    cfg = parse_config(
        [
            "--synthetic",
            "--model",
            "resnet18",
            "--base-op",
            "lars",
            "--bn-bias-separately",
            "--label-smoothing",
            "0",
            "--base-lr",
            "2",
            "--wd",
            "1e-3",
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            *flags,
        ]
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    state = build_state(cfg, engine, CPU, num_classes=10, steps_per_epoch=4, model=model)
    if precision is not None:
        state.precision = precision
    return state


def snapshot(state):
    weights = [p.detach().clone() for p in state.model.parameters()]
    momenta = [s["momentum_buffer"].clone() for s in state.optimizer.state.values() if "momentum_buffer" in s]
    return weights, momenta


def equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def overflow_skips_one_step(engine):
    state = setup(engine, ["--opt-level", "O1"])
    precision, scheduler = state.precision, state.scheduler
    g = torch.Generator().manual_seed(engine.rank)
    for step in range(4):
        images, labels = torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 10, (4,), generator=g)
        if step == 2 and engine.rank == 1:
            images[0, 0, 0, 0] = float("inf")  # only rank 1 overflows
        before, scale, sched = snapshot(state), precision.scaler.scale.item(), scheduler.last_epoch
        train_step(state, [(images, labels)], Meter(CPU))
        after = snapshot(state)
        if step == 2:
            assert equal(before[0], after[0]) and equal(before[1], after[1]), "overflowed step changed the weights"
            assert scheduler.last_epoch == sched, "overflowed step advanced the schedule"
            assert precision.scaler.scale.item() == scale / 2
        else:
            assert not equal(before[0], after[0]), f"step {step} did not update"
            assert scheduler.last_epoch == sched + 1
    assert precision.skipped_steps == 1
    return precision.skipped_steps


def lars_update_ignores_loss_scale(engine):
    updates = []
    for scale in (8.0, 4096.0):
        # A fixed scale without autocast (a policy no flag spells): the two scales' gradients
        # are then exactly comparable, so any difference would come from the unscaling.
        state = setup(engine, [], Precision(CPU, Policy("fixed", loss_scale=scale)))
        g = torch.Generator().manual_seed(10 + engine.rank)
        first = [p.detach().clone() for p in state.model.parameters()]
        for _ in range(2):
            batch = (torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 10, (4,), generator=g))
            train_step(state, [batch], Meter(CPU))
        updates.append([p.detach() - f for p, f in zip(state.model.parameters(), first)])
        updates[-1].append(state.optimizer.last_trust_ratios.clone())
    assert equal(updates[0], updates[1]), "the LARS update depends on the loss scale"


def check(engine):
    skipped = overflow_skips_one_step(engine)
    lars_update_ignores_loss_scale(engine)
    emit(rank=engine.rank, skipped_steps=skipped, lars_scale_invariant=True)
