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
stay out of the engine's gradient averaging. The gradient of a rank's own features is the sum of what
each rank's slice of the head contributes to it; that sum is exact for the loss over the
global batch, and the dense gradient of a backbone parameter is the *sum* over ranks of
what each rank's rows contribute. The engines *average* backbone
gradients, so the feature gradient is multiplied by the number of ranks. (Horovod's own
differentiable allgather averages in its backward pass, which would be off by that factor
twice over; hence the autograd functions here.)

Shards are uneven when the class (or feature) count does not divide by the number of
ranks: the first ``count % size`` ranks hold one more, the way the engines' reducescatter
splits.

Checkpoints hold the dense layout (``state.dense_state`` gathers to rank 0), the optimizer's
per-parameter tensors (momentum buffers, Adam moments) included, and
``state.broadcast_checkpoint`` hands each rank its slice, so a run can resume with any number of
processes, with or without model parallelism.

Modules: ``layer`` (the layer and its autograd functions), ``loss`` (the cross-entropy),
``lockstep`` (input that keeps every rank in every batch), ``state`` (checkpoint gather and
scatter), ``head`` (the seam the job calls: ``DenseClassifier`` or ``ShardedClassifier``).
For a user's own script, the names below are the API; see docs/model_parallel.md.
"""

from .head import DenseClassifier, ShardedClassifier, build_classifier
from .layer import (
    ParallelLinear,
    ShardingError,
    ShardNorms,
    convert_parallel_linear,
    shard_range,
    shard_sizes,
    sharded_parameter_names,
    shards,
    share_norms,
)
from .lockstep import LockstepInput
from .loss import ParallelCrossEntropyLoss
from .state import broadcast_checkpoint, dense_state

# --- TorchShard's names, for a user's own DDP or Horovod script (docs/model_parallel.md) -----------


def collect_state_dict(model, optimizer, engine) -> dict | None:
    """TorchShard's ``collect_state_dict``: ``{"model": ..., "optimizer": ...}`` in the dense
    layout (every slice of the classifier and of its optimizer state reassembled) on rank 0,
    None on the others. A collective: every rank calls it."""
    model_state, optimizer_state = dense_state(model, optimizer, engine)
    return None if model_state is None else {"model": model_state, "optimizer": optimizer_state}


def relocate_state_dict(model, optimizer, state: dict | None, engine) -> dict | None:
    """TorchShard's ``relocate_state_dict``: rank 0's dense ``{"model", "optimizer"}`` (None
    on the others) handed out so that each rank gets its own slices, ready for
    ``model.load_state_dict(out["model"])`` and ``optimizer.load_state_dict(out["optimizer"])``.
    It works for any number of ranks, whatever number saved it; None on every rank when rank 0
    passes None. A collective."""
    return broadcast_checkpoint(state, model, optimizer, engine)


def engine_for_process_group():
    """The torch engine on the process group the user's script already initialised
    (``torch.distributed.init_process_group``, as a DDP script does); to start one instead,
    ``largebatch.engines.init_engine("torch")`` (under torchrun) or ``init_engine("horovod")``."""
    import os

    import torch.distributed as dist

    from ..engines.torch import TorchEngine

    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call init_process_group first, "
            "or use largebatch.engines.init_engine('torch')"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    device = "cuda" if dist.get_backend() in ("nccl", "cpu:gloo,cuda:nccl") else "cpu"
    return TorchEngine(dist.get_rank(), dist.get_world_size(), local_rank, local_size, device)


__all__ = [
    "collect_state_dict",
    "relocate_state_dict",
    "engine_for_process_group",
    "DenseClassifier",
    "ShardedClassifier",
    "build_classifier",
    "ParallelLinear",
    "ShardingError",
    "ShardNorms",
    "convert_parallel_linear",
    "share_norms",
    "shard_range",
    "shard_sizes",
    "sharded_parameter_names",
    "shards",
    "LockstepInput",
    "ParallelCrossEntropyLoss",
    "broadcast_checkpoint",
    "dense_state",
]
