"""Under mpirun -np 2 (checks.py accumulation:OP, OP lars or sgd): N micro-batches with
--batches-per-allreduce N give the same weights as one step on the N-times larger batch (a
model without batch norm; LARS or SGD).

Built by the job's own factory (build_state) and stepped by its own train_step."""

import torch
from script import emit

from largebatch.config import parse_config
from largebatch.job import build_state
from largebatch.metrics import Meter
from largebatch.train import train_step

CPU = torch.device("cpu")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )


def run(engine, op, n_micro, micro_batch, data):
    cfg = parse_config(
        [
            "--synthetic",
            "--model",
            "resnet18",
            "--base-op",
            op,
            "--bn-bias-separately",
            "--label-smoothing",
            "0",
            "--base-lr",
            "0.5",
            "--wd",
            "1e-3",
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            "--batch-size",
            str(micro_batch),
            "--batches-per-allreduce",
            str(n_micro),
        ]
    )
    state = build_state(cfg, engine, CPU, num_classes=10, steps_per_epoch=3, model=make_model())
    images, labels = data
    for step in range(3):
        x, y = images[step], labels[step]
        micro = [
            (x[i * micro_batch : (i + 1) * micro_batch], y[i * micro_batch : (i + 1) * micro_batch])
            for i in range(n_micro)
        ]
        train_step(state, micro, Meter(CPU))
    return [p.detach().clone() for p in state.model.parameters()]


def check(engine, op: str):
    g = torch.Generator().manual_seed(100 + engine.rank)  # each rank its own data
    data = (torch.randn(3, 8, 3, 12, 12, generator=g), torch.randint(0, 10, (3, 8), generator=g))
    accumulated = run(engine, op, n_micro=2, micro_batch=4, data=data)
    whole = run(engine, op, n_micro=1, micro_batch=8, data=data)
    initial = [p.detach() for p in make_model().parameters()]
    moved = max((a - i).abs().max().item() for a, i in zip(accumulated, initial))
    worst = max((a - w).abs().max().item() for a, w in zip(accumulated, whole))
    emit(rank=engine.rank, moved=moved, difference=worst)
    assert moved > 1e-4, "the steps did not change the weights"
    assert worst < 1e-5 * max(1.0, moved), f"accumulated and whole-batch steps differ by {worst}"
