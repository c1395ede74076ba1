"""The sharded layer: ``ParallelLinear``, the autograd functions that move its rows, and
what a layer-wise optimizer needs to see whole norms (``ShardNorms``).

See ``largebatch/parallel/__init__.py`` for the layouts and why the gradients are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engines.base import shard_range, shard_sizes  # the engines' split rule, which the layout follows


class ShardingError(ValueError):
    """The layer cannot be split as asked (too few classes or features for the ranks, or a
    checkpoint that does not fit). The command line words it as a flag error."""


def gather_rows(tensor: torch.Tensor, engine, name: str) -> tuple[torch.Tensor, int]:
    """Every rank's rows, concatenated in rank order, and where this rank's rows start.
    Ranks may hold different numbers of rows (a batch short of unreadable images), or none."""
    counts = engine.allgather(torch.tensor([tensor.shape[0]]), name=f"{name}.rows").tolist()
    return engine.allgather(tensor.detach().contiguous(), name=name), sum(counts[: engine.rank])


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows. Backward: the gradient of this rank's rows summed over
    the ranks (each rank's slice of the head used them), times the number of ranks because
    the DistributedOptimizer averages the backbone's gradients (see the module notes)."""

    @staticmethod
    def forward(ctx, rows, engine, name):
        full, ctx.start = gather_rows(rows, engine, name)
        ctx.count, ctx.engine, ctx.name = rows.shape[0], engine, name
        return full

    @staticmethod
    def backward(ctx, grad):
        total = ctx.engine.allreduce_sum(grad.contiguous(), name=f"{ctx.name}.grad")
        return total.narrow(0, ctx.start, ctx.count) * ctx.engine.size, None, None


class _SumScatterClasses(torch.autograd.Function):
    """Forward: partial logits ``(classes, rows)`` summed over the ranks, each rank keeping
    its class slice. Backward: every rank's partial fed every class, so each gets the
    gradient of all of them (an allgather of the slices)."""

    @staticmethod
    def forward(ctx, partial, engine, name, local_classes):
        out = engine.reducescatter_sum(partial.contiguous(), name=name)
        if out.shape[0] != local_classes:
            raise RuntimeError(
                f"the engine's reducescatter gave rank {engine.rank} {out.shape[0]} classes, "
                f"expected {local_classes}: its split rule is not the one this layer assumes"
            )
        ctx.engine, ctx.name = engine, name
        return out

    @staticmethod
    def backward(ctx, grad):
        return ctx.engine.allgather(grad.contiguous(), name=f"{ctx.name}.grad"), None, None, None


class ParallelLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` split over the ranks of ``engine`` along
    ``dim`` (1: output classes, 0: input features). Takes this rank's rows of features and
    returns this rank's class slice of the logits for every rank's rows, in rank order."""

    def __init__(
        self, in_features: int, out_features: int, dim: int, engine, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (split input features) or 1 (split output classes), got {dim}")
        # Both layouts leave each rank a slice of the classes (dim 0 after its reduce-scatter).
        for count, what in [(out_features, "classes")] + ([(in_features, "input features")] if dim == 0 else []):
            if count < engine.size:
                raise ShardingError(
                    f"dim {dim} splits the classifier's {count} {what} over "
                    f"{engine.size} processes: fewer than one each"
                )
        self.in_features, self.out_features, self.dim, self.engine = in_features, out_features, dim, engine
        self.class_range = shard_range(out_features, engine.size, engine.rank)
        self.feature_range = shard_range(in_features, engine.size, engine.rank) if dim == 0 else (0, in_features)
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
            return shard_sizes(self.in_features, self.engine.size)
        return shard_sizes(self.out_features, self.engine.size)

    @classmethod
    def from_dense(cls, linear: nn.Linear, dim: int, engine) -> ParallelLinear:
        layer = cls(
            linear.in_features,
            linear.out_features,
            dim,
            engine,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            (c0, c1), (f0, f1) = layer.class_range, layer.feature_range
            layer.weight.copy_(linear.weight[c0:c1] if dim == 1 else linear.weight[:, f0:f1])
            if linear.bias is not None:
                assert layer.bias is not None  # built with bias=True
                layer.bias.copy_(linear.bias[c0:c1])
        return layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        full = _GatherRows.apply(features, self.engine, "mp.features")
        if self.dim == 1:
            return F.linear(full, self.weight, self.bias)
        f0, f1 = self.feature_range
        # (classes, rows) rather than (rows, classes): reducescatter splits dim 0.
        partial = torch.matmul(self.weight, full[:, f0:f1].t())
        logits = _SumScatterClasses.apply(partial, self.engine, "mp.logits", self.local_classes).t()
        return logits + self.bias if self.bias is not None else logits.contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, "
            f"rank={self.engine.rank}/{self.engine.size}, classes={self.class_range}, features={self.feature_range}"
        )


def convert_parallel_linear(model: nn.Module, dim: int, engine) -> nn.Module:
    """Replace the model's final ``nn.Linear`` (the last one registered: the classifier of
    every torchvision model that has one) in place with its ``ParallelLinear`` slice.
    Every rank must hold the same dense weights (same seed), so that the slices form one
    layer. Returns the model."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name, module
    if last is None:
        raise ShardingError(
            f"a model-parallel classifier needs a model whose classifier is an nn.Linear; "
            f"{type(model).__name__} has none"
        )
    name, linear = last
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, ParallelLinear.from_dense(linear, dim, engine))
    return model


@dataclass
class Shard:
    """A parameter that is one rank's slice of a dense tensor."""

    param: nn.Parameter
    axis: int  # the dense tensor's axis it is a slice of
    sizes: list[int]  # every rank's extent along that axis

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
                out[f"{prefix}.{pname}" if prefix else pname] = Shard(
                    getattr(module, pname), axis, module.dense_sizes(pname)
                )
    return out


def sharded_parameter_names(model: nn.Module) -> set[str]:
    """Parameters each rank owns: kept out of the gradient averaging and the start-up broadcast."""
    return set(shards(model))


class ShardNorms:
    """For LARS and LAMB (``optimizer.norms_across_shards``): the trust ratio uses the norm of
    a whole weight, so the norms of the slices are combined, sqrt(sum of squares)."""

    def __init__(self, model: nn.Module, engine):
        self.ids = {id(s.param) for s in shards(model).values()}
        self.engine = engine

    def __call__(self, params: list[torch.Tensor], norms: list[torch.Tensor]) -> list[torch.Tensor]:
        picked = [i for i, p in enumerate(params) if id(p) in self.ids]
        if not picked:
            return norms
        squares = torch.stack([norms[i] for i in picked]).double().square()
        whole = self.engine.allreduce_sum(squares, name="mp.norms").sqrt().to(norms[0].dtype)
        norms = list(norms)
        for j, i in enumerate(picked):
            norms[i] = whole[j]
        return norms


def share_norms(optimizer, model: nn.Module, engine) -> None:
    """Let a layer-wise adaptive optimizer see the norms of whole sharded tensors; plain
    SGD uses no norms and has no such hook."""
    if shards(model) and hasattr(optimizer, "norms_across_shards"):
        optimizer.norms_across_shards = ShardNorms(model, engine)
