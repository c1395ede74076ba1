"""largebatch/metrics.py in one process (dist=None): top-k hits and the sample-weighted
averages a Meter reports, against the same numbers computed directly, row by row."""

from __future__ import annotations

import pytest
import torch

from largebatch.metrics import Meter, topk_hits


def direct_hits(logits: torch.Tensor, target: torch.Tensor, k: int) -> int:
    """Rows whose target is among the k largest logits, one row at a time."""
    hits = 0
    for row, t in zip(logits.tolist(), target.tolist()):
        ranked = sorted(range(len(row)), key=lambda c: row[c], reverse=True)
        hits += t in ranked[:k]
    return hits


@pytest.mark.parametrize("rows, classes", [(64, 10), (33, 1000), (5, 3), (8, 1)])
def test_topk_hits_count_the_rows_whose_target_is_among_the_k_best(rows, classes):
    g = torch.Generator().manual_seed(rows * classes)
    logits = torch.randn(rows, classes, generator=g)
    target = torch.randint(0, classes, (rows,), generator=g)
    top1, top5 = topk_hits(logits, target)
    # Fewer than 5 classes: top-5 is every class, so every row hits.
    assert (top1.item(), top5.item()) == (direct_hits(logits, target, 1), direct_hits(logits, target, 5))
    assert [h.item() for h in topk_hits(logits, target, ks=(1, 2, 3))] == [
        direct_hits(logits, target, k) for k in (1, 2, 3)
    ]


def test_topk_hits_of_a_known_case():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # target 1: first
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # target 1: second
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        ]
    )  # target 5: last of 6, outside the top 5
    top1, top5 = topk_hits(logits, torch.tensor([1, 1, 5]))
    assert (top1.item(), top5.item()) == (1, 2)


def test_meter_reports_sample_weighted_means_over_uneven_batches_and_resets():
    g = torch.Generator().manual_seed(0)
    meter = Meter(torch.device("cpu"))
    batches = []
    for n in (16, 16, 5, 1):  # the last batches of an epoch are smaller: they must weigh less
        logits = torch.randn(n, 20, generator=g)
        target = torch.randint(0, 20, (n,), generator=g)
        loss = torch.nn.functional.cross_entropy(logits, target)
        meter.add(loss, logits, target)
        batches.append((loss.item(), logits, target))
    total = sum(t.numel() for _, _, t in batches)
    expected = {
        "loss": sum(loss * t.numel() for loss, _, t in batches) / total,
        "top1": 100 * sum(direct_hits(lg, t, 1) for _, lg, t in batches) / total,
        "top5": 100 * sum(direct_hits(lg, t, 5) for _, lg, t in batches) / total,
        "count": total,
    }
    got = meter.reduce(None, "val")
    assert got["count"] == expected["count"]
    for key in ("loss", "top1", "top5"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    # The loss is the mean over samples, not over batches (the two differ with uneven batches).
    assert got["loss"] != pytest.approx(sum(loss for loss, _, _ in batches) / len(batches), rel=1e-6)
    assert meter.reduce(None, "val") == {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0, "nonfinite_steps": 0}, (
        "reading must start a new interval"
    )


def test_meter_counts_with_a_criterions_own_hits():
    # A model-parallel criterion brings its own hits (same signature as topk_hits).
    meter = Meter(torch.device("cpu"), hits=lambda logits, target: [torch.tensor(3), torch.tensor(4)])
    meter.add(torch.tensor(2.0), torch.zeros(4, 7), torch.zeros(4, dtype=torch.long))
    assert meter.reduce(None, "train") == {"loss": 2.0, "top1": 75.0, "top5": 100.0, "count": 4, "nonfinite_steps": 0}


def test_meter_counts_steps_taken_on_a_non_finite_loss_until_read():
    meter = Meter(torch.device("cpu"))
    meter.add(torch.tensor(float("nan")), torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    meter.add_step(torch.tensor(1.0))
    meter.add_step(torch.tensor(0.0))  # a step whose losses were all finite
    assert meter.reduce(None, "train")["nonfinite_steps"] == 1
    assert meter.reduce(None, "train")["nonfinite_steps"] == 0


class _SumOfRanks:
    """The reduction of ranks whose tensors are given: what allreduce_sum returns to each."""

    def __init__(self, tensors):
        self.total = sum(tensors)

    def allreduce_sum(self, tensor, name):
        return self.total


def test_a_step_non_finite_on_several_ranks_counts_once():
    """Two ranks, three steps: both ranks non-finite in step 2, one of them in step 3. The
    run had 2 non-finite steps, not 3 (the sum over ranks) nor 1 (the most on one rank)."""
    ranks = [Meter(torch.device("cpu")) for _ in range(2)]
    for meter, flags in zip(ranks, ([0, 1, 1], [0, 1, 0])):
        for flag in flags:
            meter.add_step(torch.tensor(float(flag)))
    locals_ = [torch.cat([m.sums, *m.steps]) for m in ranks]
    assert ranks[0].reduce(_SumOfRanks(locals_), "train")["nonfinite_steps"] == 2
