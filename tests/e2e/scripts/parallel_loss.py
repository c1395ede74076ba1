"""Under mpirun (3 ranks: uneven class slices): ParallelCrossEntropyLoss on each rank's class
slice equals torch's CrossEntropyLoss on the dense logits (loss and this slice's gradient),
with label smoothing and ignore_index; top-1/top-5 hits equal metrics.topk_hits on the dense
logits of this rank's rows. One rank holds no rows at all; ParallelLinear (dim 0 and 1)
returns the slice of the dense layer's logits for every rank's rows."""

import torch
import torch.nn.functional as F
from script import emit, start_engine

from largebatch.metrics import topk_hits
from largebatch.parallel import ParallelCrossEntropyLoss, ParallelLinear, shard_range

ROWS = [6, 0, 5]  # rows held by ranks 0, 1, 2 (rank 1 none); more ranks repeat the pattern


def rows_of(dist) -> slice:
    sizes = [ROWS[r % len(ROWS)] for r in range(dist.size)]
    return slice(sum(sizes[: dist.rank]), sum(sizes[: dist.rank + 1])), sum(sizes)


def check_loss(dist, num_classes: int, smoothing: float, ignore_index: int) -> None:
    own, total = rows_of(dist)
    g = torch.Generator().manual_seed(num_classes)
    target = torch.randint(0, num_classes, (total,), generator=g)
    dense = 3 * torch.randn(total, num_classes, generator=g)
    dense[::2, :].scatter_add_(1, target[::2, None], torch.full((len(target[::2]), 1), 4.0))  # some top-1 hits
    dense.requires_grad_()
    target[1] = ignore_index  # some rows take no part
    target[-1] = ignore_index if ignore_index < 0 else target[-1]
    expected = F.cross_entropy(dense, target, label_smoothing=smoothing, ignore_index=ignore_index)
    expected.backward()

    c0, c1 = shard_range(num_classes, dist.size, dist.rank)
    shard = dense.detach()[:, c0:c1].clone().requires_grad_()
    criterion = ParallelCrossEntropyLoss(num_classes, dist, label_smoothing=smoothing, ignore_index=ignore_index)
    loss = criterion(shard, target[own])
    loss.backward()
    case = f"{num_classes} classes, smoothing {smoothing}, ignore_index {ignore_index}"
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), f"{case}: loss {loss.item()} != {expected.item()}"
    assert torch.allclose(shard.grad, dense.grad[:, c0:c1], atol=1e-6), (
        f"{case}: gradient differs by {(shard.grad - dense.grad[:, c0:c1]).abs().max():.2e}"
    )

    hits = criterion.topk_hits(shard.detach(), target[own])
    valid = target[own] != ignore_index  # an ignored row has no class to hit
    reference = topk_hits(dense.detach()[own][valid], target[own][valid])
    assert [int(h) for h in hits] == [int(h) for h in reference], f"{case}: hits {hits} != {reference}"
    emit(check="loss", rank=dist.rank, case=case, loss=loss.item(), torch=expected.item(), hits=[int(h) for h in hits])


def check_layer(dist, dim: int, in_features: int, num_classes: int) -> None:
    own, total = rows_of(dist)
    torch.manual_seed(1)
    dense = torch.nn.Linear(in_features, num_classes)
    features = torch.randn(total, in_features)
    layer = ParallelLinear.from_dense(dense, dim, dist)
    c0, c1 = layer.class_range
    out = layer(features[own])
    expected = dense(features)[:, c0:c1]
    assert torch.allclose(out, expected, atol=1e-5), f"dim {dim}: logits differ by {(out - expected).abs().max():.2e}"
    emit(check="layer", rank=dist.rank, dim=dim, classes=[c0, c1])


def main():
    dist = start_engine()
    for num_classes in (11, 3):
        for smoothing in (0.0, 0.2):
            for ignore_index in (-100, 2):
                check_loss(dist, num_classes, smoothing, ignore_index)
    for dim in (0, 1):
        check_layer(dist, dim, in_features=17, num_classes=11)


if __name__ == "__main__":
    main()
