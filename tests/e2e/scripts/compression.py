"""Under mpirun -np 2 (checks.py compression): gradients reduced by the engine, for each compression
(none, fp16, bf16 where the engine has it) and --gradient-predivide-factor 1 and 4, against
the exact fp32 average of every rank's own gradients (all gathered).

Uncompressed: the average to fp32 rounding. Compressed: off by no more than the dtype's
rounding, and off at all (the values did travel in the narrower type)."""

import torch
from script import emit

from largebatch.engines.base import Engine

DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def local_gradients(model, data) -> list[torch.Tensor]:
    images, labels = data
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def reduced_gradients(engine: Engine, data, compression, predivide) -> list[torch.Tensor]:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradients = engine.gradients(
        optimizer, model, micro_batches=1, compression=compression, adasum=False, predivide=predivide
    )
    images, labels = data
    with gradients.backward(last=True):
        torch.nn.functional.cross_entropy(gradients.module(images), labels).backward()
    gradients.reduce()
    out = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    return out


def check(engine):
    g = torch.Generator().manual_seed(10 + engine.rank)
    data = torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    own = local_gradients(make_model(), data)
    everyone = engine.allgather_object(own)
    exact = [sum(parts) / engine.size for parts in zip(*everyone)]
    for name, dtype in DTYPES.items():
        if name == "bf16" and "bf16_allreduce" not in engine.features:
            continue
        for predivide in (1.0, 4.0):
            got = reduced_gradients(engine, data, dtype, predivide)
            error = max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(got, exact))
            emit(rank=engine.rank, compression=name, predivide=predivide, error=error)
