"""TorchShard's way of working with largebatch's model-parallel classifier, from your own
DDP script: convert the final linear layer, train with the parallel cross-entropy, save with
collect_state_dict and load with relocate_state_dict.

    torchrun --standalone --nproc_per_node 2 docs/examples/torchshard_style.py [OUT_DIR]

CPU and gloo, a tiny model, synthetic data, a few steps. It checks that the reloaded model
and optimizer equal the trained ones, prints one JSON line per rank, and exits non-zero if not.
"""

import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.parallel import (
    ParallelCrossEntropyLoss,
    collect_state_dict,
    convert_parallel_linear,
    engine_for_process_group,
    relocate_state_dict,
    sharded_parameter_names,
)

CLASSES, FEATURES, BATCH = 10, 16, 8


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every rank builds the same dense weights: the slices then form one layer
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, FEATURES), nn.ReLU(), nn.Linear(FEATURES, CLASSES))


def main() -> int:
    dist.init_process_group("gloo")  # your script's own process group (torchrun's environment)
    try:
        return train_and_check()
    finally:
        # Once train_and_check has returned and its objects are collected, nothing else holds
        # the group (its DDP model is gone), so Gloo's threads end here. Left to the
        # interpreter's exit, one of them can still be dropping a tensor: "terminate called
        # without an active exception" (pytorch/pytorch#190489).
        gc.collect()
        dist.destroy_process_group()


def train_and_check() -> int:
    engine = engine_for_process_group()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir())
    out.mkdir(parents=True, exist_ok=True)

    # 1. split the classifier (dim=1: classes; TorchShard's -1 is the same dimension)
    model = convert_parallel_linear(make_model(), 1, engine)
    # 2. DDP averages the backbone's gradients; each rank's slice is its own, so DDP must
    #    neither broadcast nor average it
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(sharded_parameter_names(model)))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # 3. the loss over the global batch, from the slices (no rank holds the dense logits)
    criterion = ParallelCrossEntropyLoss(CLASSES, engine)

    g = torch.Generator().manual_seed(100 + engine.rank)  # each rank its own images
    losses = []
    for _ in range(4):
        images, labels = torch.randn(BATCH, 3, 4, 4, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
        loss = criterion(ddp(images), labels)  # the layer gathers features, the loss gathers labels
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    # 4. save: the dense layer and its momentum, on rank 0
    checkpoint = collect_state_dict(model, optimizer, engine)
    path = out / "torchshard_style.pt"
    if engine.rank == 0:
        assert checkpoint["model"]["3.weight"].shape == (CLASSES, FEATURES)  # dense on disk
        torch.save(checkpoint, path)
    dist.barrier()

    # 5. load into a fresh model and optimizer: each rank receives its slices
    fresh = convert_parallel_linear(make_model(), 1, engine)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    dense = torch.load(path, weights_only=True) if engine.rank == 0 else None
    mine = relocate_state_dict(fresh, fresh_optimizer, dense, engine)
    fresh.load_state_dict(mine["model"])
    fresh_optimizer.load_state_dict(mine["optimizer"])

    same_model = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    same_momentum = all(
        torch.equal(optimizer.state[a]["momentum_buffer"], fresh_optimizer.state[b]["momentum_buffer"])
        for a, b in zip(model.parameters(), fresh.parameters())
    )
    print(
        json.dumps(
            {
                "rank": engine.rank,
                "losses": losses,
                "slice": list(model[3].weight.shape),
                "same_model": same_model,
                "same_momentum": same_momentum,
            }
        ),
        flush=True,
    )
    return 0 if same_model and same_momentum else 1


if __name__ == "__main__":
    sys.exit(main())
