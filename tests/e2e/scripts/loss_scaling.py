"""Under mpirun -np 2, through the job's own train_step:
1. an overflow on one rank (O1, dynamic scale) skips exactly that step on every rank:
   weights, LARS momentum and the schedule are untouched, the scale halves, the skip is counted;
2. LARS sees unscaled gradients: the same step at two loss scales gives the same update."""
import torch

from largebatch.config import parse_config
from largebatch.dist import Dist
from largebatch.job import build_optimizer, build_scheduler
from largebatch.metrics import Meter
from largebatch.precision import LEVELS, Policy, Precision
from largebatch.train import train_step

CPU = torch.device("cpu")


def setup(dist, precision):
    cfg = parse_config(["--synthetic", "--model", "resnet18", "--base-op", "lars", "--base-lr", "2", "--wd", "1e-3",
                        "--epochs", "2", "--warmup-epochs", "1"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(32, 10))
    model = precision.prepare(model)
    optimizer = dist.distributed_optimizer(build_optimizer(cfg, model, cfg.lr(dist.size)), model,
                                           backward_passes_per_step=1, fp16_allreduce=False, adasum=False,
                                           predivide=1.0)
    return model, optimizer, build_scheduler(cfg, optimizer, steps_per_epoch=4)


def state(model, optimizer):
    weights = [p.detach().clone() for p in model.parameters()]
    momenta = [s["momentum_buffer"].clone() for s in optimizer.state.values() if "momentum_buffer" in s]
    return weights, momenta


def equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def overflow_skips_one_step(dist):
    precision = Precision(CPU, LEVELS["O1"])
    model, optimizer, scheduler = setup(dist, precision)
    g = torch.Generator().manual_seed(dist.rank)
    for step in range(4):
        images, labels = torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 10, (4,), generator=g)
        if step == 2 and dist.rank == 1:
            images[0, 0, 0, 0] = float("inf")  # only rank 1 overflows
        before, scale, sched = state(model, optimizer), precision.scaler.scale.item(), scheduler.last_epoch
        train_step(model, torch.nn.CrossEntropyLoss(), optimizer, scheduler, precision, [(images, labels)], Meter(CPU))
        after = state(model, optimizer)
        if step == 2:
            assert equal(before[0], after[0]) and equal(before[1], after[1]), "overflowed step changed the weights"
            assert scheduler.last_epoch == sched, "overflowed step advanced the schedule"
            assert precision.scaler.scale.item() == scale / 2
        else:
            assert not equal(before[0], after[0]), f"step {step} did not update"
            assert scheduler.last_epoch == sched + 1
    assert precision.skipped_steps == 1


def lars_update_ignores_loss_scale(dist):
    updates = []
    for scale in (8.0, 4096.0):
        precision = Precision(CPU, Policy("fixed", loss_scale=scale))
        model, optimizer, scheduler = setup(dist, precision)
        g = torch.Generator().manual_seed(10 + dist.rank)
        first = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            batch = (torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 10, (4,), generator=g))
            train_step(model, torch.nn.CrossEntropyLoss(), optimizer, scheduler, precision, [batch], Meter(CPU))
        updates.append([p.detach() - f for p, f in zip(model.parameters(), first)])
        ratios = optimizer.last_trust_ratios
        updates[-1].append(ratios.clone())
    assert equal(updates[0], updates[1]), "the LARS update depends on the loss scale"


def main():
    dist = Dist.init()
    overflow_skips_one_step(dist)
    lars_update_ignores_loss_scale(dist)
    print(f"rank {dist.rank}: loss scaling ok", flush=True)


if __name__ == "__main__":
    main()
