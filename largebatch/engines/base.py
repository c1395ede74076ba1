"""What the job asks of a distributed engine, whichever it is.

An engine knows the ranks, runs collectives on tensors (any dtype, any memory layout: an
engine that cannot move one carries it as a contiguous fp32 copy, see ``carrier``) and on
picklable objects, gives every rank rank 0's initial model, and owns gradient averaging
through a ``Gradients`` object, which the training step asks for exactly three things: a
context for each micro-batch's backward pass, "reduce this step's gradients", and "step".
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import ClassVar

import torch


class EngineError(RuntimeError):
    """The engine is missing or was built without something the run asks for."""


# What Gloo's TCP transport says when the process at the other end of a connection is gone:
# "[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:27024. This is ..."
_PEER_GONE = re.compile(
    r"gloo/transport/\S+\] (?P<what>.*?(?:Connection closed by peer|Connection reset by peer|"
    r"Broken pipe).*?)(?:\. |\.?$)",
    re.S,
)


def lost_peer(error: BaseException) -> str | None:
    """The one-line reason when ``error`` is a collective failing because another rank's
    process went away (killed, crashed); None for anything else."""
    if not isinstance(error, RuntimeError):
        return None
    m = _PEER_GONE.search(str(error))
    return " ".join(m["what"].split()) if m else None


def carrier(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor every engine can send: bfloat16 as an fp32 copy (exact), non-contiguous
    (channels-last) memory as a contiguous copy; anything else as it is."""
    if tensor.dtype == torch.bfloat16:
        return tensor.float().contiguous()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def carried(collective, tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``collective(tensor)`` through a carrier, returned in the tensor's own dtype."""
    out = collective(carrier(tensor), *args, **kwargs)
    return out.to(tensor.dtype) if out.dtype != tensor.dtype else out


def shard_sizes(total: int, parts: int) -> list[int]:
    """Rows (classes or features) held by each of ``parts`` ranks: the first ``total % parts``
    hold one more: how every engine's reducescatter splits, and so the model-parallel layout."""
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def shard_range(total: int, parts: int, rank: int) -> tuple[int, int]:
    sizes = shard_sizes(total, parts)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


class Gradients:
    """How one optimizer step's gradients are averaged across ranks. The training step:

    for each micro-batch:
        with gradients.backward(last=is_last): forward (through ``module``), loss, backward
    gradients.reduce()   # every rank now holds the averaged gradients
    ...unscale, check for overflow...
    gradients.step()     # the optimizer step, without reducing again
    """

    def __init__(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module):
        self.optimizer = optimizer
        self.module = module  # what the forward pass runs through (an engine may wrap the model)

    def backward(self, last: bool):
        return contextlib.nullcontext()

    def reduce(self) -> None:
        pass

    def step(self) -> None:
        self.optimizer.step()


@dataclass
class Engine:
    rank: int
    size: int
    local_rank: int
    local_size: int
    name: ClassVar[str] = "none"
    # Optional capabilities, named as the job asks for them ("adasum", "timeline", "bf16_allreduce").
    features: ClassVar[frozenset[str]] = frozenset()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Release what the engine holds before the process exits (the job calls it on every
        way out of a run)."""

    # --- start-up and model state -------------------------------------------------------
    def broadcast_model(self, model: torch.nn.Module, exclude: frozenset[str] = frozenset()) -> None:
        """Give every rank rank 0's parameters and buffers, except those named in ``exclude``
        (the shards of a model-parallel layer, which differ by rank)."""
        raise NotImplementedError

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average floating-point buffers (batch norm's running statistics) across ranks, so
        every rank validates with the same model and the checkpoint holds what all used."""
        raise NotImplementedError

    def gradients(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        *,
        micro_batches: int,
        compression: torch.dtype | None,
        adasum: bool,
        predivide: float,
        exclude: frozenset[str] = frozenset(),
    ) -> Gradients:
        """Average the gradients of ``model``'s parameters (those not in ``exclude``, which each
        rank owns) once per ``micro_batches`` backward passes, for ``optimizer``, sent as
        ``compression`` (torch.float16, torch.bfloat16 where the engine has "bf16_allreduce")
        or as they are (None)."""
        raise NotImplementedError

    def sync_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    # --- objects --------------------------------------------------------------------------
    def broadcast_object(self, obj, name: str = "object"):
        raise NotImplementedError

    def allgather_object(self, obj, name: str = "object") -> list:
        raise NotImplementedError

    # --- tensors --------------------------------------------------------------------------
    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def allreduce_max(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Concatenate along dim 0 across ranks, in rank order (row counts may differ)."""
        raise NotImplementedError

    def reducescatter_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Sum across ranks; each rank keeps a slice of dim 0, the first (rows % size) ranks
        one row more than the others."""
        raise NotImplementedError

    def gather_to_root(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0 on rank 0 only; others get an empty
        tensor. Unlike allgather, only rank 0 ever holds the whole."""
        raise NotImplementedError

    def scatter_from_root(self, tensor: torch.Tensor, counts: list[int], name: str) -> torch.Tensor:
        """Rank 0's tensor cut along dim 0 into ``counts[r]`` rows for rank r. The other ranks
        pass an empty tensor of the same dtype and trailing shape."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    # --- profiling --------------------------------------------------------------------------
    def start_timeline(self, path: str) -> None:
        raise EngineError(f"the {self.name} engine has no timeline")

    def stop_timeline(self) -> None:
        pass
