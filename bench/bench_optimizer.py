"""Optimizer step cost over ResNet-50's parameters: LARS and LAMB against SGD, same run.

    .venv/bin/python bench/bench_optimizer.py [--model resnet50] [--rounds 9] [--steps 5] [--threads 1]

Rows, each stepping its own copy of the model's parameters with fixed random gradients:
  SGD (foreach)        torch.optim.SGD(foreach=True), momentum 0.9, weight decay on weights
                       only: the job's --base-op sgd grouping (the baseline)
  LARS (lars.py)       the job's LARS: trust ratios with torch._foreach ops; the update with
                       foreach kernels and no host sync on a GPU, as a per-tensor loop of
                       in-place kernels on the CPU
  LARS (per-tensor)    the same arithmetic as a Python loop over tensors that reads each
                       norm back to the host (``.item()``) to decide the trust ratio, as the
                       original trainer's LARS did; checked to give the same weights
  LAMB (lars.py)       the job's LAMB

Normalisation weights and biases get no weight decay and no trust ratio in every row
(``--bn-bias-separately``, the default). Each round times ``--steps`` steps of every row,
back to back, in an order rotated from round to round (on a GPU with a synchronisation
before and after); the ratio to SGD is taken within each round, the table gives medians
over the rounds. Writes bench/results/optimizer.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

# Siblings in bench/: `python bench/<script>.py` puts the script's own directory first on
# sys.path, so they import as top-level modules; largebatch and lars come from the install.
from machine import describe, load

import lars

ROOT = Path(__file__).resolve().parents[1]

LR, MOMENTUM, WD, EPS, ETA = 0.1, 0.9, 5e-5, 1e-5, 0.001


class PerTensorLARS(torch.optim.Optimizer):
    """LARS written the straightforward way: a loop over tensors, with each trust ratio
    decided on the host. Same update as lars.LARS (lr and trust inside the momentum)."""

    def __init__(self, params, lr, momentum, weight_decay, eta, epsilon):
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, epsilon=epsilon, lars_adaptation=True),
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            wd, lr = group["weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                trust = 1.0
                if group["lars_adaptation"]:
                    w_norm, g_norm = p.norm().item(), p.grad.norm().item()  # two host syncs per tensor
                    if w_norm > 0 and g_norm > 0:
                        trust = group["eta"] * w_norm / (g_norm + wd * w_norm + group["epsilon"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update, alpha=lr * trust)
                p.sub_(buf)


def groups(model: torch.nn.Module) -> list[dict]:
    """The job's grouping: weights decay and adapt; normalisation weights and biases do neither."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_adaptation": False},
    ]


def build(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "SGD (foreach)":
        sgd_groups = [{k: v for k, v in g.items() if k != "lars_adaptation"} for g in groups(model)]
        return torch.optim.SGD(sgd_groups, lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=True)
    if name == "LARS (lars.py)":
        return lars.create_optimizer_lars(
            model, lr=LR, momentum=MOMENTUM, weight_decay=WD, bn_bias_separately=True, epsilon=EPS, eta=ETA
        )
    if name == "LARS (per-tensor, host sync)":
        return PerTensorLARS(groups(model), lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA, epsilon=EPS)
    if name == "LAMB (lars.py)":
        return lars.create_optimizer_lamb(model, lr=LR * 0.01, weight_decay=WD, bn_bias_separately=True)
    raise ValueError(name)


NAMES = ["SGD (foreach)", "LARS (lars.py)", "LARS (per-tensor, host sync)", "LAMB (lars.py)"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replica(model: torch.nn.Module, grads: list[torch.Tensor]) -> torch.nn.Module:
    """A copy of the model with the given gradients (deepcopy does not copy .grad)."""
    copied = copy.deepcopy(model)
    for param, grad in zip(copied.parameters(), grads):
        param.grad = grad.clone()
    return copied


def naive_matches_lars(model: torch.nn.Module, grads: list[torch.Tensor]) -> bool:
    """Both LARS rows compute the same update: two steps from the same state agree (and move
    the weights)."""
    a, b = replica(model, grads), replica(model, grads)
    opt_a, opt_b = build("LARS (lars.py)", a), build("LARS (per-tensor, host sync)", b)
    for _ in range(2):
        opt_a.step()
        opt_b.step()
    moved = any(not torch.equal(x, y) for x, y in zip(a.parameters(), model.parameters()))
    return moved and all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a.parameters(), b.parameters()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=5, help="steps per row per round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (ignored on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "optimizer.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = describe()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).to(device)
    grads = [torch.randn_like(param) * 0.01 for param in model.parameters()]
    n_params = sum(param.numel() for param in model.parameters())
    n_tensors = len(list(model.parameters()))
    same = naive_matches_lars(model, grads)

    optimizers = {}
    for name in NAMES:
        optimizers[name] = build(name, replica(model, grads))
        for _ in range(2):  # creates the state (momentum buffers), first-call costs
            optimizers[name].step()
    sync(device)

    ms: dict[str, list[float]] = {name: [] for name in NAMES}
    for r in range(args.rounds):
        for name in NAMES[r % len(NAMES) :] + NAMES[: r % len(NAMES)]:
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizers[name].step()
            sync(device)
            ms[name].append(1000 * (time.perf_counter() - start) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {ms[n][-1]:.1f} ms" for n in NAMES), file=sys.stderr)

    base = "SGD (foreach)"
    rows = []
    for name in NAMES:
        per_round = [x / b for x, b in zip(ms[name], ms[base])]
        rows.append(
            {
                "optimizer": name,
                "ms_per_step": round(statistics.median(ms[name]), 3),
                "vs_sgd": round(statistics.median(per_round), 3),
                "ms_per_round": [round(x, 3) for x in ms[name]],
                "vs_sgd_per_round": [round(x, 3) for x in per_round],
            }
        )
    naive = "LARS (per-tensor, host sync)"
    speedup = statistics.median(n / f for n, f in zip(ms[naive], ms["LARS (lars.py)"]))
    report = {
        "command": " ".join(["python bench/bench_optimizer.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine, "load_average_at_end": load()},
        "settings": {
            "model": args.model,
            "parameters": n_params,
            "tensors": n_tensors,
            "device": str(device),
            "threads": args.threads if device.type == "cpu" else None,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
        },
        "per_tensor_lars_matches_lars": same,
        "lars_speedup_over_per_tensor": round(speedup, 3),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"Optimizer step over {args.model}'s {n_params / 1e6:.1f}M parameters ({n_tensors} tensors) on {device}"
        + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
        + f"; median of {args.rounds} interleaved rounds of {args.steps} steps"
    )
    print()
    print("| optimizer | ms per step | vs SGD (foreach) |")
    print("| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['optimizer']} | {row['ms_per_step']:.2f} | {row['vs_sgd']:.2f}x |")
    print()
    print(
        f"LARS (lars.py) is {speedup:.2f}x as fast as the per-tensor loop; "
        f"the two give the same weights: {'yes' if same else 'NO'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
