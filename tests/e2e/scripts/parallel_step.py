"""Under mpirun: steps of the model-parallel model (classifier split along DIM) give the
weights and optimizer state of the dense model stepped on one process with the same global
batch: backbone on every rank, classifier reassembled on rank 0.

    checks.py parallel_step:DIM

Covers SGD, LARS and LAMB; even and uneven class counts; an odd feature count (uneven
feature slices for dim 0); ranks with different numbers of rows; label smoothing. Uses the
job's own factory (build_state) and its train_step."""

import copy

import torch
from script import emit

from largebatch.config import parse_config
from largebatch.job import build_optimizer, build_scheduler, build_state
from largebatch.metrics import Meter
from largebatch.train import train_step

STEPS, GLOBAL_BATCH = 2, 12


def make_model(num_classes: int) -> torch.nn.Module:
    # No batch norm: its statistics would differ between a per-rank and a global batch.
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 7, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d((1, 3)),
        torch.nn.Flatten(),
        torch.nn.Linear(21, num_classes),
    )


def own_rows(dist) -> slice:
    """Uneven on purpose: rank r holds more rows than rank r + 1."""
    sizes = [GLOBAL_BATCH // dist.size + (2 if r == 0 else 0) for r in range(dist.size)]
    sizes[-1] = GLOBAL_BATCH - sum(sizes[:-1])
    start = sum(sizes[: dist.rank])
    return slice(start, start + sizes[dist.rank])


def compare(dist, dim: int, op: str, num_classes: int) -> None:
    cfg = parse_config(
        [
            "--synthetic",
            "--model",
            "resnet18",
            "--base-op",
            op,
            "--bn-bias-separately",
            "--base-lr",
            "0.5",
            "--wd",
            "1e-3",
            "--lars-eta",
            "0.02",
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            "--label-smoothing",
            "0.1",
            "--enable-model-parallel",
            "--model-parallel-dim",
            str(dim),
        ]
    )
    g = torch.Generator().manual_seed(num_classes)  # the same global batches on every rank
    images = torch.randn(STEPS, GLOBAL_BATCH, 3, 8, 8, generator=g)
    labels = torch.randint(0, num_classes, (STEPS, GLOBAL_BATCH), generator=g)

    dense = make_model(num_classes)
    initial = copy.deepcopy(dense.state_dict())
    dense_opt = build_optimizer(cfg, dense, cfg.lr(dist.size))
    dense_sched = build_scheduler(cfg, dense_opt, steps_per_epoch=3)
    dense_loss = torch.nn.CrossEntropyLoss(label_smoothing=cfg.model.label_smoothing)
    for step in range(STEPS):
        dense_loss(dense(images[step]), labels[step]).backward()
        dense_opt.step()
        dense_sched.step()
        dense_opt.zero_grad()

    state = build_state(cfg, dist, torch.device("cpu"), num_classes, steps_per_epoch=3, model=make_model(num_classes))
    rows = own_rows(dist)
    for step in range(STEPS):
        train_step(state, [(images[step][rows], labels[step][rows])], Meter(torch.device("cpu"), state.classifier.hits))

    model, owned = state.model, state.classifier.owned(state.model)
    model_state, optimizer_state = state.classifier.gather_state(model, state.optimizer)
    case = f"dim {dim} {op} {num_classes} classes"
    # Float rounding differs (sums split across ranks); LAMB divides by sqrt(v), which turns
    # a rounding-level difference of a near-zero gradient into a larger one of the update.
    tolerance = 1e-6 if op != "lamb" else 2e-5
    for name, p in model.named_parameters():  # the backbone, on every rank
        if name not in owned:
            diff = (p.detach() - dense.state_dict()[name]).abs().max().item()
            assert diff < tolerance, f"{case}: rank {dist.rank} backbone {name} differs from dense by {diff:.2e}"
    if not dist.is_main:
        return
    moved = max((dense.state_dict()[k] - initial[k]).abs().max().item() for k in initial)
    worst = max((model_state[k] - v).abs().max().item() for k, v in dense.state_dict().items())
    for i, entry in dense_opt.state_dict()["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.ndim:
                mine = optimizer_state["state"][i][key]
                assert mine.shape == value.shape, f"{case}: optimizer state {i}/{key} is not dense: {tuple(mine.shape)}"
                worst = max(worst, (mine - value).abs().max().item())
            else:
                assert optimizer_state["state"][i][key] == value, f"{case}: optimizer state {i}/{key} differs"
    emit(case=case, moved=moved, difference=worst, tolerance=tolerance)
    assert moved > 1e-3, f"{case}: the steps did not change the weights"
    assert worst < tolerance, f"{case}: sharded and dense steps differ by {worst:.2e}"


def check(dist, dim: str):
    dim = int(dim)
    for op in ("sgd", "lars", "lamb"):
        for num_classes in (10, 7):
            compare(dist, dim, op, num_classes)
