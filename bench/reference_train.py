"""The baseline of bench_train.py: the smallest Horovod training loop that does the same
work per step as our job, and nothing else (no metrics, no logging, no checkpoints).

    mpirun -np N python bench/reference_train.py --model resnet18 --image-size 64 --batch-size 32 \
        --steps 30 --warmup-steps 10

torchvision model, cross-entropy, SGD with momentum and weight decay wrapped by
``hvd.DistributedOptimizer``, synthetic input made as the job's ``--synthetic`` makes it
(a pool of 4 random batches, reused). Rank 0 prints one JSON line: images per second over
all ranks, from the end of step ``--warmup-steps`` to the end of step ``--steps``.

It imports Horovod directly, on purpose: it is the plain Horovod loop our job is measured
against, so it must not go through ``largebatch.engines``.
"""

from __future__ import annotations

import argparse
import json
import time

import horovod.torch as hvd
import torch
import torchvision

# Only the seed mixer, so that the synthetic tensors are the job's, number for number.
from largebatch.data.sampler import mix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.0125)
    p.add_argument("--wd", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()

    hvd.init()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", hvd.local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=args.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    criterion = torch.nn.CrossEntropyLoss()

    g = torch.Generator().manual_seed(mix(args.seed, hvd.rank()))
    shape = (4, args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randn(shape, generator=g).to(device)
    labels = torch.randint(0, args.num_classes, shape[:2], generator=g).to(device)

    model.train()
    start = None
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        loss = criterion(model(images[step % 4]), labels[step % 4])
        loss.backward()
        optimizer.step()
        if step == args.warmup_steps:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if hvd.rank() == 0:
        images_done = (args.steps - args.warmup_steps) * args.batch_size * hvd.size()
        print(
            json.dumps({"images_per_sec": images_done / seconds, "seconds": seconds, "final_loss": loss.item()}),
            flush=True,
        )


if __name__ == "__main__":
    main()
