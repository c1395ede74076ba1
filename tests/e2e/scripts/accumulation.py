"""Under mpirun -np 2: N micro-batches with backward_passes_per_step=N give the same
weights as one step on the N-times larger batch (a model without batch norm, LARS).

Uses the job's own pieces: config, optimizer factory, Horovod wrapper, train_step."""
import sys

import torch

from largebatch.config import parse_config
from largebatch.dist import Dist
from largebatch.job import build_optimizer, build_scheduler
from largebatch.metrics import Meter
from largebatch.precision import Precision
from largebatch.train import train_step


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(32, 10))


def run(dist, n_micro, micro_batch, data):
    cfg = parse_config(["--synthetic", "--model", "resnet18", "--base-op", sys.argv[1], "--base-lr", "0.5",
                        "--wd", "1e-3", "--epochs", "2", "--warmup-epochs", "1",
                        "--batch-size", str(micro_batch), "--batches-per-allreduce", str(n_micro)])
    model = make_model()
    optimizer = dist.distributed_optimizer(build_optimizer(cfg, model, cfg.lr(dist.size)), model,
                                           backward_passes_per_step=n_micro, fp16_allreduce=False,
                                           adasum=False, predivide=1.0)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=3)
    images, labels = data
    for step in range(3):
        x, y = images[step], labels[step]
        micro = [(x[i * micro_batch:(i + 1) * micro_batch], y[i * micro_batch:(i + 1) * micro_batch])
                 for i in range(n_micro)]
        train_step(model, torch.nn.CrossEntropyLoss(), optimizer, scheduler, Precision(torch.device("cpu")),
                   micro, Meter(torch.device("cpu")))
    return [p.detach().clone() for p in model.parameters()]


def main():
    dist = Dist.init()
    g = torch.Generator().manual_seed(100 + dist.rank)  # each rank its own data
    data = (torch.randn(3, 8, 3, 12, 12, generator=g), torch.randint(0, 10, (3, 8), generator=g))
    accumulated = run(dist, n_micro=2, micro_batch=4, data=data)
    whole = run(dist, n_micro=1, micro_batch=8, data=data)
    initial = [p.detach() for p in make_model().parameters()]
    moved = max((a - i).abs().max().item() for a, i in zip(accumulated, initial))
    worst = max((a - w).abs().max().item() for a, w in zip(accumulated, whole))
    print(f"rank {dist.rank}: moved {moved:.3e}, largest difference {worst:.3e}", flush=True)
    assert moved > 1e-4, "the steps did not change the weights"
    assert worst < 1e-5 * max(1.0, moved), f"accumulated and whole-batch steps differ by {worst}"


if __name__ == "__main__":
    main()
