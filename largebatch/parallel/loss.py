"""Cross-entropy over logits split by class, from per-row collectives only."""

from __future__ import annotations

import torch
from torch import nn

from .layer import gather_rows, shard_range


class _ParallelCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over every rank's rows, from this rank's class slice of
    the logits. Forward: per-row collectives only. Backward: this slice's gradient, with no
    communication (softmax minus the smoothed target, for the classes held here)."""

    @staticmethod
    def forward(ctx, logits, target, loss_fn):
        engine, eps, num_classes = loss_fn.engine, loss_fn.label_smoothing, loss_fn.num_classes
        z = logits.float()
        row_max = engine.allreduce_max(z.max(dim=1).values, name="mp.ce.max")
        probs = (z - row_max[:, None]).exp_()
        valid, owned, index = loss_fn.locate(target, z.shape[1])
        target_logit = torch.where(owned, z.gather(1, index).squeeze(1), 0.0)
        parts = [probs.sum(dim=1), target_logit] + ([z.sum(dim=1)] if eps else [])
        sums = engine.allreduce_sum(torch.stack(parts), name="mp.ce.sums")
        # -sum_c q_c log p_c with q = (1 - eps) one_hot + eps / C: log Z - (1 - eps) z_t - eps mean(z)
        row_loss = sums[0].log() + row_max - (1 - eps) * sums[1]
        if eps:
            row_loss = row_loss - eps / num_classes * sums[2]
        # torch returns NaN for a batch of ignored rows only; 0 keeps the running means usable.
        count = valid.sum().clamp(min=1)
        loss = torch.where(valid, row_loss, 0.0).sum() / count
        probs /= sums[0][:, None]
        ctx.save_for_backward(probs, valid, owned, index, count)
        ctx.eps, ctx.num_classes, ctx.dtype = eps, num_classes, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, valid, owned, index, count = ctx.saved_tensors
        grad = probs - ctx.eps / ctx.num_classes
        grad.scatter_add_(1, index, owned[:, None].to(grad.dtype) * -(1 - ctx.eps))
        grad *= (valid.to(grad.dtype) * grad_loss / count)[:, None]
        return grad.to(ctx.dtype), None, None


class ParallelCrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss(label_smoothing=..., ignore_index=...)`` (mean reduction) over the
    global batch, for logits split by class as ``ParallelLinear`` returns them. Takes this
    rank's class slice of the logits for every rank's rows and this rank's own targets;
    returns the same loss on every rank."""

    def __init__(self, num_classes: int, engine, label_smoothing: float = 0.0, ignore_index: int = -100):
        super().__init__()
        self.num_classes, self.engine = num_classes, engine
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index
        self.class_start = shard_range(num_classes, engine.size, engine.rank)[0]

    def locate(self, target: torch.Tensor, local_classes: int):
        """Rows that count, rows whose target class is held here, and its local column."""
        valid = target != self.ignore_index
        local = target - self.class_start
        owned = valid & (local >= 0) & (local < local_classes)
        return valid, owned, local.clamp(0, local_classes - 1)[:, None]

    def _targets(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        full, start = gather_rows(target, self.engine, "mp.targets")
        if full.shape[0] != logits.shape[0]:
            raise ValueError(
                f"logits have {logits.shape[0]} rows but the ranks' targets {full.shape[0]}: "
                f"pass this rank's slice of the logits for the whole global batch"
            )
        return full.to(logits.device), start

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        full, _ = self._targets(logits, target)
        return _ParallelCrossEntropy.apply(logits, full, self)

    @torch.no_grad()
    def topk_hits(self, logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
        """For this rank's own rows: how many have the target among the k highest logits
        (as ``metrics.topk_hits`` on dense logits). A target is in the top k when fewer
        than k logits of its row exceed it; that count is summed over the slices."""
        own = target.shape[0]
        full, start = self._targets(logits, target)
        valid, owned, index = self.locate(full, logits.shape[1])
        # In fp32 (exact for fp16/bf16 logits); the comparison in the logits' own dtype.
        target_logit = torch.where(owned, logits.gather(1, index).squeeze(1).float(), 0.0)
        target_logit = self.engine.allreduce_sum(target_logit, name="mp.hits.target").to(logits.dtype)
        above = self.engine.allreduce_sum((logits > target_logit[:, None]).sum(dim=1), name="mp.hits.above")
        rows = slice(start, start + own)
        return [((above < k) & valid)[rows].sum() for k in ks]
