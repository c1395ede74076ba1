"""A model-parallel classifier for very many classes, and its cross-entropy.

The backbone stays data-parallel; only the final ``nn.Linear`` is split across the ranks:

* ``dim=1`` (class-parallel): rank r holds a slice of the output classes, i.e. of the rows
  of the weight and of the bias.
* ``dim=0`` (feature-parallel): rank r holds a slice of the input features, i.e. of the
  columns of the weight. Its partial logits (for every class) are summed over the ranks by
  a reduce-scatter that leaves each rank the same class slice as ``dim=1`` would, plus that
  slice of the bias, so both layouts feed the same loss and metrics.

Each rank's features are gathered first, so every rank computes its slice of the logits for
the whole global batch; ``ParallelCrossEntropyLoss`` gathers the targets the same way and
computes the loss from per-row collectives only (row max, sum of exponentials, the target
logit from the rank that owns it), never a dense logit matrix or one-hot on one rank.

Gradients are those of the dense model on the global batch. The loss is the mean over the
global batch, identical on every rank. A shard's gradient involves every row, and every
rank has every row, so the sharded parameters' gradients are complete on their owner and
stay out of Horovod's averaging. The gradient of a rank's own features is the sum of what
each rank's slice of the head contributes to it; that sum is exact for the loss over the
global batch, and the dense gradient of a backbone parameter is the *sum* over ranks of
what each rank's rows contribute. Horovod's DistributedOptimizer *averages* backbone
gradients, so the feature gradient is multiplied by the number of ranks. (Horovod's own
differentiable allgather averages in its backward pass, which would be off by that factor
twice over; hence the autograd functions here.)

Shards are uneven when the class (or feature) count does not divide by the number of
ranks: the first ``count % size`` ranks hold one more, the way Horovod's reducescatter
splits.

Checkpoints hold the dense layout (``dense_state`` gathers to rank 0), the optimizer's
per-parameter tensors (momentum buffers, Adam moments) included, and
``broadcast_checkpoint`` hands each rank its slice, so a run can resume with any number of
processes, with or without model parallelism.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import UsageError


def shard_sizes(total: int, parts: int) -> list[int]:
    """Rows (classes or features) held by each of ``parts`` ranks: the first ``total % parts``
    hold one more. Horovod's reducescatter splits this way too, which ``dim=0`` relies on."""
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def shard_range(total: int, parts: int, rank: int) -> tuple[int, int]:
    sizes = shard_sizes(total, parts)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _carried(collective, tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Run a ``Dist`` collective on ``tensor``. Horovod 0.28 moves no bfloat16, so such a
    tensor travels as an fp32 copy (exact) and comes back as bfloat16."""
    if tensor.dtype == torch.bfloat16:
        return collective(tensor.float(), *args, **kwargs).to(torch.bfloat16)
    return collective(tensor, *args, **kwargs)


def gather_rows(tensor: torch.Tensor, dist, name: str) -> tuple[torch.Tensor, int]:
    """Every rank's rows, concatenated in rank order, and where this rank's rows start.
    Ranks may hold different numbers of rows (a batch short of unreadable images), or none."""
    counts = dist.allgather(torch.tensor([tensor.shape[0]]), name=f"{name}.rows").tolist()
    return _carried(dist.allgather, tensor.detach().contiguous(), name=name), sum(counts[:dist.rank])


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows. Backward: the gradient of this rank's rows summed over
    the ranks (each rank's slice of the head used them), times the number of ranks because
    the DistributedOptimizer averages the backbone's gradients (see the module notes)."""

    @staticmethod
    def forward(ctx, rows, dist, name):
        full, ctx.start = gather_rows(rows, dist, name)
        ctx.count, ctx.dist, ctx.name = rows.shape[0], dist, name
        return full

    @staticmethod
    def backward(ctx, grad):
        total = _carried(ctx.dist.allreduce_sum, grad.contiguous(), name=f"{ctx.name}.grad")
        return total.narrow(0, ctx.start, ctx.count) * ctx.dist.size, None, None


class _SumScatterClasses(torch.autograd.Function):
    """Forward: partial logits ``(classes, rows)`` summed over the ranks, each rank keeping
    its class slice. Backward: every rank's partial fed every class, so each gets the
    gradient of all of them (an allgather of the slices)."""

    @staticmethod
    def forward(ctx, partial, dist, name, local_classes):
        out = _carried(dist.reducescatter_sum, partial.contiguous(), name=name)
        if out.shape[0] != local_classes:
            raise RuntimeError(f"Horovod's reducescatter gave rank {dist.rank} {out.shape[0]} classes, "
                               f"expected {local_classes}: its split rule is not the one this layer assumes")
        ctx.dist, ctx.name = dist, name
        return out

    @staticmethod
    def backward(ctx, grad):
        return _carried(ctx.dist.allgather, grad.contiguous(), name=f"{ctx.name}.grad"), None, None, None


class ParallelLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` split over the ranks of ``dist`` along
    ``dim`` (1: output classes, 0: input features). Takes this rank's rows of features and
    returns this rank's class slice of the logits for every rank's rows, in rank order."""

    def __init__(self, in_features: int, out_features: int, dim: int, dist, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (split input features) or 1 (split output classes), got {dim}")
        # Both layouts leave each rank a slice of the classes (dim 0 after its reduce-scatter).
        for count, what in [(out_features, "classes")] + ([(in_features, "input features")] if dim == 0 else []):
            if count < dist.size:
                raise UsageError(f"--model-parallel-dim {dim} splits the classifier's {count} {what} over "
                                 f"{dist.size} processes: fewer than one each")
        self.in_features, self.out_features, self.dim, self.dist = in_features, out_features, dim, dist
        self.class_range = shard_range(out_features, dist.size, dist.rank)
        self.feature_range = shard_range(in_features, dist.size, dist.rank) if dim == 0 else (0, in_features)
        local_classes = self.class_range[1] - self.class_range[0]
        local_features = self.feature_range[1] - self.feature_range[0]
        rows, cols = (local_classes, in_features) if dim == 1 else (out_features, local_features)
        self.weight = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local_classes, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    @property
    def local_classes(self) -> int:
        return self.class_range[1] - self.class_range[0]

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, with the bound of the dense layer's fan-in.
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def shard_axes(self) -> dict[str, int]:
        """For each parameter, the axis of the dense tensor that it is a slice of."""
        axes = {"weight": 0 if self.dim == 1 else 1}
        if self.bias is not None:
            axes["bias"] = 0
        return axes

    def dense_sizes(self, axis_of: str) -> list[int]:
        """Every rank's extent along the sliced axis of parameter ``axis_of``."""
        if axis_of == "weight" and self.dim == 0:
            return shard_sizes(self.in_features, self.dist.size)
        return shard_sizes(self.out_features, self.dist.size)

    @classmethod
    def from_dense(cls, linear: nn.Linear, dim: int, dist) -> "ParallelLinear":
        layer = cls(linear.in_features, linear.out_features, dim, dist, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            (c0, c1), (f0, f1) = layer.class_range, layer.feature_range
            layer.weight.copy_(linear.weight[c0:c1] if dim == 1 else linear.weight[:, f0:f1])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[c0:c1])
        return layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        full = _GatherRows.apply(features, self.dist, "mp.features")
        if self.dim == 1:
            return F.linear(full, self.weight, self.bias)
        f0, f1 = self.feature_range
        # (classes, rows) rather than (rows, classes): reducescatter splits dim 0.
        partial = torch.matmul(self.weight, full[:, f0:f1].t())
        logits = _SumScatterClasses.apply(partial, self.dist, "mp.logits", self.local_classes).t()
        return logits + self.bias if self.bias is not None else logits.contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, "
                f"rank={self.dist.rank}/{self.dist.size}, classes={self.class_range}, features={self.feature_range}")


def convert_parallel_linear(model: nn.Module, dim: int, dist) -> nn.Module:
    """Replace the model's final ``nn.Linear`` (the last one registered: the classifier of
    every torchvision model that has one) in place with its ``ParallelLinear`` slice.
    Every rank must hold the same dense weights (same seed), so that the slices form one
    layer. Returns the model."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name, module
    if last is None:
        raise UsageError(f"--enable-model-parallel needs a model whose classifier is an nn.Linear; "
                         f"{type(model).__name__} has none")
    name, linear = last
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, ParallelLinear.from_dense(linear, dim, dist))
    return model


@dataclass
class Shard:
    """A parameter that is one rank's slice of a dense tensor."""
    param: nn.Parameter
    axis: int               # the dense tensor's axis it is a slice of
    sizes: list[int]        # every rank's extent along that axis

    @property
    def dense_shape(self) -> tuple[int, ...]:
        shape = list(self.param.shape)
        shape[self.axis] = sum(self.sizes)
        return tuple(shape)


def shards(model: nn.Module) -> dict[str, Shard]:
    """The sharded parameters by their names in ``model.named_parameters()``, in the same
    order on every rank."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ParallelLinear):
            for pname, axis in module.shard_axes().items():
                out[f"{prefix}.{pname}" if prefix else pname] = Shard(getattr(module, pname), axis,
                                                                      module.dense_sizes(pname))
    return out


def sharded_parameter_names(model: nn.Module) -> set[str]:
    """Parameters each rank owns: kept out of the gradient averaging and the start-up broadcast."""
    return set(shards(model))


class ShardNorms:
    """For LARS and LAMB (``optimizer.norms_across_shards``): the trust ratio uses the norm of
    a whole weight, so the norms of the slices are combined, sqrt(sum of squares)."""

    def __init__(self, model: nn.Module, dist):
        self.ids = {id(s.param) for s in shards(model).values()}
        self.dist = dist

    def __call__(self, params: list[torch.Tensor], norms: list[torch.Tensor]) -> list[torch.Tensor]:
        picked = [i for i, p in enumerate(params) if id(p) in self.ids]
        if not picked:
            return norms
        squares = torch.stack([norms[i] for i in picked]).double().square()
        whole = self.dist.allreduce_sum(squares, name="mp.norms").sqrt().to(norms[0].dtype)
        norms = list(norms)
        for j, i in enumerate(picked):
            norms[i] = whole[j]
        return norms


def share_norms(optimizer, model: nn.Module, dist) -> None:
    """Let a layer-wise adaptive optimizer see the norms of whole sharded tensors; plain
    SGD uses no norms and has no such hook."""
    if shards(model) and hasattr(optimizer, "norms_across_shards"):
        optimizer.norms_across_shards = ShardNorms(model, dist)


class _ParallelCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over every rank's rows, from this rank's class slice of
    the logits. Forward: per-row collectives only. Backward: this slice's gradient, with no
    communication (softmax minus the smoothed target, for the classes held here)."""

    @staticmethod
    def forward(ctx, logits, target, loss_fn):
        dist, eps, num_classes = loss_fn.dist, loss_fn.label_smoothing, loss_fn.num_classes
        z = logits.float()
        row_max = dist.allreduce_max(z.max(dim=1).values, name="mp.ce.max")
        probs = (z - row_max[:, None]).exp_()
        valid, owned, index = loss_fn.locate(target, z.shape[1])
        target_logit = torch.where(owned, z.gather(1, index).squeeze(1), 0.0)
        parts = [probs.sum(dim=1), target_logit] + ([z.sum(dim=1)] if eps else [])
        sums = dist.allreduce_sum(torch.stack(parts), name="mp.ce.sums")
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

    def __init__(self, num_classes: int, dist, label_smoothing: float = 0.0, ignore_index: int = -100):
        super().__init__()
        self.num_classes, self.dist = num_classes, dist
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index
        self.class_start = shard_range(num_classes, dist.size, dist.rank)[0]

    def locate(self, target: torch.Tensor, local_classes: int):
        """Rows that count, rows whose target class is held here, and its local column."""
        valid = target != self.ignore_index
        local = target - self.class_start
        owned = valid & (local >= 0) & (local < local_classes)
        return valid, owned, local.clamp(0, local_classes - 1)[:, None]

    def _targets(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        full, start = gather_rows(target, self.dist, "mp.targets")
        if full.shape[0] != logits.shape[0]:
            raise ValueError(f"logits have {logits.shape[0]} rows but the ranks' targets {full.shape[0]}: "
                             f"pass this rank's slice of the logits for the whole global batch")
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
        target_logit = self.dist.allreduce_sum(target_logit, name="mp.hits.target").to(logits.dtype)
        above = self.dist.allreduce_sum((logits > target_logit[:, None]).sum(dim=1), name="mp.hits.above")
        rows = slice(start, start + own)
        return [((above < k) & valid)[rows].sum() for k in ks]


# --- input: every rank takes part in every batch -----------------------------------------

class LockstepInput:
    """Wraps an input object (same interface) so that every rank runs every batch: the
    sharded head is a collective, so a rank cannot skip one. A micro-batch with no readable
    image becomes an empty one (zero rows), and validation goes on with empty batches on
    ranks that have run out until every rank has (their shares may differ by a batch)."""

    def __init__(self, data, dist, image_size: int, device: torch.device):
        self.data, self.dist, self.device = data, dist, device
        self.num_classes = data.num_classes
        self.batches_per_epoch = data.batches_per_epoch
        self.empty_shape = (0, 3, image_size, image_size)

    @property
    def bad_files(self) -> set[str]:
        return self.data.bad_files

    def _empty(self, like):
        images, labels = like if like is not None else (None, None)
        if images is None:  # none seen yet: the shape every input produces
            return (torch.zeros(self.empty_shape, device=self.device),
                    torch.zeros(0, dtype=torch.long, device=self.device))
        return images[:0], labels[:0]

    def train(self, epoch: int, start_batch: int = 0):
        # Every rank runs the same number of training batches; only unreadable ones need filling.
        batches, last = self.data.train(epoch, start_batch=start_batch), None
        try:
            for images, labels in batches:
                if images is None:
                    images, labels = self._empty(last)
                else:
                    last = images, labels
                yield images, labels
        finally:
            batches.close()

    def val(self):
        batches, last = iter(self.data.val()), None
        try:
            while True:
                item = next(batches, None)
                more = self.dist.allreduce_max(torch.tensor([0 if item is None else 1]), name="mp.val.more")
                if not int(more):
                    return
                if item is None or item[0] is None:
                    item = self._empty(last)
                else:
                    last = item
                yield item
        finally:
            getattr(batches, "close", lambda: None)()


# --- checkpoints: the dense layout on disk, slices in memory ------------------------------

def _optimizer_index(optimizer) -> dict[int, int]:
    """Parameter id -> its key in ``optimizer.state_dict()['state']`` (torch numbers the
    parameters across the param groups in order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def _is_slice(value, shard: Shard) -> bool:
    return torch.is_tensor(value) and value.shape == shard.param.shape


def _gather_to_root(tensor: torch.Tensor, shard: Shard, dist, name: str) -> torch.Tensor | None:
    rows = tensor.detach() if shard.axis == 0 else tensor.detach().t()
    whole = _carried(dist.gather_to_root, rows.contiguous(), name=name)
    if not dist.is_main:
        return None
    return whole.cpu() if shard.axis == 0 else whole.t().contiguous().cpu()


def _scatter_from_root(whole: torch.Tensor | None, shard: Shard, dist, name: str) -> torch.Tensor:
    if dist.is_main:
        rows = (whole if shard.axis == 0 else whole.t()).to(shard.param.dtype).contiguous()
    else:
        trailing = shard.param.shape[1:] if shard.axis == 0 else shard.param.t().shape[1:]
        rows = torch.empty((0, *trailing), dtype=shard.param.dtype)
    mine = _carried(dist.scatter_from_root, rows, shard.sizes, name=name)
    return mine if shard.axis == 0 else mine.t().contiguous()


def dense_state(model: nn.Module, optimizer, dist) -> tuple[dict | None, dict | None]:
    """The model's and optimizer's state dicts, every sharded tensor reassembled in the dense
    layout: on rank 0; ``(None, None)`` on the others. A collective when the model has
    shards (every rank calls it); for a dense model, rank 0's own state dicts."""
    model_state = model.state_dict() if dist.is_main else None
    optimizer_state = optimizer.state_dict() if dist.is_main else None
    index = _optimizer_index(optimizer)
    for name, shard in shards(model).items():
        whole = _gather_to_root(shard.param, shard, dist, name=f"mp.save.{name}")
        if dist.is_main:
            model_state[name] = whole
        state = optimizer.state.get(shard.param, {})
        for key in sorted(k for k, v in state.items() if _is_slice(v, shard)):
            whole = _gather_to_root(state[key], shard, dist, name=f"mp.save.{name}.{key}")
            if dist.is_main:
                i = index[id(shard.param)]
                # A copy: state_dict() shares the per-parameter dicts with the live optimizer.
                optimizer_state["state"][i] = {**optimizer_state["state"][i], key: whole}
    return model_state, optimizer_state


def broadcast_checkpoint(state: dict | None, model: nn.Module, optimizer, dist) -> dict | None:
    """Rank 0's checkpoint (or None) on every rank, each holding only its own slice of every
    sharded tensor, ready for ``load_state_dict``. The dense classifier never goes to the
    other ranks whole: rank 0 takes it out before the broadcast and scatters the slices."""
    sharded = shards(model)
    if not sharded:
        return dist.broadcast_object(state, name="checkpoint")
    index = _optimizer_index(optimizer)
    plan, dense, problem = [], {}, ""
    if dist.is_main and state is not None:
        for name, shard in sharded.items():
            whole = state["model"].get(name)
            if whole is None or tuple(whole.shape) != shard.dense_shape:
                found = "no such entry" if whole is None else f"shape {tuple(whole.shape)}"
                problem = f"the checkpoint's {name} ({found}) does not fit this model's {shard.dense_shape}"
                break
            dense[(name, None)] = state["model"].pop(name)
            plan.append((name, None))
            entry = state["optimizer"]["state"].get(index[id(shard.param)], {})
            dense_keys = [k for k, v in entry.items() if torch.is_tensor(v) and tuple(v.shape) == shard.dense_shape]
            for key in sorted(dense_keys):
                dense[(name, key)] = entry.pop(key)
                plan.append((name, key))
    problem = dist.broadcast_object(problem, name="checkpoint_shards_check")
    if problem:
        raise UsageError(problem)
    state, plan = dist.broadcast_object((state, plan), name="checkpoint")
    for name, key in plan:
        shard = sharded[name]
        mine = _scatter_from_root(dense.pop((name, key), None), shard, dist,
                                  name=f"mp.load.{name}" + (f".{key}" if key else ""))
        if key is None:
            state["model"][name] = mine
        else:
            state["optimizer"]["state"][index[id(shard.param)]][key] = mine
    return state
