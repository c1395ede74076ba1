"""Horovod (over MPI or Gloo): mpirun, horovodrun, srun.

Horovod 0.28 cannot reduce or broadcast bfloat16 tensors, nor non-contiguous ones
(channels-last weights): every tensor goes through ``base.carrier``, gradients included
(a compression wrapper).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .base import Engine, EngineError, Gradients, carried, carrier


def _horovod():
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise EngineError(f"Horovod is not installed in this environment ({e}); run `make setup`") from None
    return hvd


class HorovodGradients(Gradients):
    """Horovod's DistributedOptimizer counts backward passes itself and starts each
    parameter's allreduce from a hook during the last one."""

    # horovod.torch's DistributedOptimizer: the wrapped optimizer's own class plus synchronize()
    # and skip_synchronize(); Horovod has no types.
    optimizer: Any

    def reduce(self) -> None:
        self.optimizer.synchronize()

    def step(self) -> None:
        with self.optimizer.skip_synchronize():
            self.optimizer.step()


def _carried_compression(base):
    """A Horovod compression that sends gradients through ``carrier`` around ``base``."""

    class Carried:
        @staticmethod
        def compress(tensor):
            compressed, ctx = base.compress(carrier(tensor))
            return compressed, (ctx, tensor.dtype)

        @staticmethod
        def decompress(tensor, ctx):
            inner, dtype = ctx
            return base.decompress(tensor, inner).to(dtype)

    return Carried


class HorovodEngine(Engine):
    name = "horovod"
    features = frozenset({"adasum", "timeline"})

    @classmethod
    def init(cls, timeline: bool = False) -> HorovodEngine:
        hvd = _horovod()
        if timeline:
            os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")  # read by init: start/stop at will later
        hvd.init()
        return cls(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())

    def _each_async(self, tensors, start) -> None:
        """Start ``start(carrier, name)`` for every (name, tensor), then wait and copy back."""
        hvd = _horovod()
        handles = []
        for name, tensor in tensors:
            c = carrier(tensor)
            handles.append((tensor, c, start(c, name)))
        for tensor, c, handle in handles:
            hvd.synchronize(handle)
            if c is not tensor:
                tensor.copy_(c)

    def broadcast_model(self, model, exclude=frozenset()) -> None:
        # Not Horovod's broadcast_optimizer_state: a fresh optimizer has no state, and that
        # function runs a dummy step() to create some, which with weight decay moves the
        # weights. A resumed optimizer's state travels with the checkpoint (broadcast_object).
        hvd = _horovod()
        self._each_async(
            ((n, t) for n, t in model.state_dict().items() if n not in exclude),
            lambda c, n: hvd.broadcast_async_(c, root_rank=0, name=f"bcast.{n}"),
        )

    def average_buffers(self, model) -> None:
        hvd = _horovod()
        self._each_async(
            ((n, t) for n, t in model.named_buffers() if t.is_floating_point()),
            lambda c, n: hvd.allreduce_async_(c, op=hvd.Average, name=f"buf.{n}"),
        )

    def gradients(
        self, optimizer, model, *, micro_batches, compression, adasum, predivide, exclude=frozenset()
    ) -> Gradients:
        hvd = _horovod()
        # Horovod hooks an allreduce onto every named parameter that requires grad when the
        # wrapper is built; the ones each rank owns are hidden from it for that moment.
        hidden = [p for n, p in model.named_parameters() if n in exclude and p.requires_grad]
        for p in hidden:
            p.requires_grad_(False)
        try:
            wrapped = hvd.DistributedOptimizer(
                optimizer,
                named_parameters=list(model.named_parameters()),
                compression=_carried_compression(
                    hvd.Compression.fp16 if compression == torch.float16 else hvd.Compression.none
                ),
                backward_passes_per_step=micro_batches,
                op=hvd.Adasum if adasum else hvd.Average,
                gradient_predivide_factor=predivide,
            )
        finally:
            for p in hidden:
                p.requires_grad_(True)
        return HorovodGradients(wrapped, model)

    def sync_batchnorm(self, model):
        """Replace every BatchNorm layer with Horovod's synchronised one (CUDA tensors only)."""
        hvd = _horovod()

        def convert(module):
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                new = hvd.SyncBatchNorm(
                    module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
                )
                new.load_state_dict(module.state_dict())
                return new
            for child_name, child in module.named_children():
                module.add_module(child_name, convert(child))
            return module

        return convert(model)

    def broadcast_object(self, obj, name="object"):
        return _horovod().broadcast_object(obj, root_rank=0, name=name)

    def allgather_object(self, obj, name="object") -> list:
        return _horovod().allgather_object(obj, name=name)

    def allreduce_sum(self, tensor, name):
        hvd = _horovod()
        return carried(hvd.allreduce, tensor, op=hvd.Sum, name=name)

    def allreduce_max(self, tensor, name):
        hvd = _horovod()
        return carried(hvd.allreduce, tensor, op=hvd.Max, name=name)

    def allgather(self, tensor, name):
        return carried(_horovod().allgather, tensor, name=name)

    def reducescatter_sum(self, tensor, name):
        hvd = _horovod()
        return carried(hvd.reducescatter, tensor, op=hvd.Sum, name=name)

    def gather_to_root(self, tensor, name):
        splits = torch.zeros(self.size, dtype=torch.int32)
        splits[0] = tensor.shape[0]
        return carried(lambda t: _horovod().alltoall(t, splits=splits, name=name)[0], tensor.detach())

    def scatter_from_root(self, tensor, counts, name):
        splits = torch.tensor(counts if self.is_main else [0] * self.size, dtype=torch.int32)
        return carried(lambda t: _horovod().alltoall(t, splits=splits, name=name)[0], tensor.detach())

    def barrier(self) -> None:
        _horovod().barrier()

    def start_timeline(self, path: str) -> None:
        _horovod().start_timeline(path, mark_cycles=False)

    def stop_timeline(self) -> None:
        _horovod().stop_timeline()
