"""Sample-weighted running sums of loss and top-k hits, reduced across ranks on demand.

The sums stay on the device between reductions, so the training step never waits for
the host; a reduction (one allreduce of four numbers and a flag per step) happens only when someone reads.
"""

from __future__ import annotations

import torch


def topk_hits(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """How many rows have the target among the k highest logits, for each k."""
    kmax = min(max(ks), logits.size(1))
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(target.unsqueeze(1))
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


class Meter:
    """Accumulates [loss*n, top1 hits, top5 hits, n], and per optimizer step whether its loss
    was not finite."""

    def __init__(self, device: torch.device, hits=topk_hits):
        # A model-parallel criterion sees only a slice of every row's logits and brings its
        # own ``hits`` (counted across the ranks, with the signature of ``topk_hits``).
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.steps: list[torch.Tensor] = []  # one flag per optimizer step since the last reduction
        self.hits = hits

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        top1, top5 = self.hits(logits.detach(), target)
        n = target.numel()
        self.sums[:4] += torch.stack(
            [
                loss.detach().double() * n,
                top1.double(),
                top5.double(),
                torch.tensor(float(n), dtype=torch.float64, device=self.sums.device),
            ]
        )

    def add_step(self, nonfinite: torch.Tensor) -> None:
        """One optimizer step: ``nonfinite`` (on the device: no sync) is 1 if it was taken
        although a loss of this rank was inf or NaN, else 0 (steps that loss scaling skipped
        changed nothing and count 0). Every rank adds one per step, so the flags line up."""
        self.steps.append(nonfinite.to(torch.float64).reshape(1))

    def reduce(self, dist, name: str) -> dict:
        """Average over every sample of every rank since the last reset. A step counts once
        as non-finite however many ranks saw a non-finite loss in it: the flags are summed
        position by position in the same allreduce."""
        local = torch.cat([self.sums, *self.steps]).cpu()
        total = dist.allreduce_sum(local, name=name) if dist is not None else local
        loss, top1, top5, n = total[:4].tolist()
        nonfinite = int((total[4:] > 0).sum())
        self.sums.zero_()
        self.steps = []
        d = max(n, 1.0)  # an empty interval reports zeros (and a count of 0), not a division by zero
        return {
            "loss": loss / d,
            "top1": 100 * top1 / d,
            "top5": 100 * top5 / d,
            "count": int(n),
            "nonfinite_steps": nonfinite,
        }
