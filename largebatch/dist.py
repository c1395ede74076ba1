"""Everything the job asks of the distributed engine, and the only module that imports it.

Today the engine is Horovod (over MPI or Gloo). The training loop talks to a ``Dist``
object, so a second engine (torch.distributed, say) means a second class here, not edits
across the loop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


class EngineError(RuntimeError):
    """Horovod is missing or was built without something the run asks for."""


@dataclass
class Dist:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- start-up -----------------------------------------------------------------------
    @classmethod
    def init(cls, timeline: bool = False) -> "Dist":
        hvd = _horovod()
        if timeline:
            os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")  # read by init: start/stop at will later
        hvd.init()
        return cls(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())

    def shutdown(self) -> None:
        _horovod().shutdown()

    def broadcast_model(self, model: torch.nn.Module, exclude: set[str] | frozenset[str] = frozenset()) -> None:
        """Give every rank rank 0's parameters and buffers, except those named in
        ``exclude`` (the shards of a model-parallel layer, which differ by rank).

        The optimizer is deliberately not broadcast here: a fresh optimizer has no state,
        and Horovod's broadcast_optimizer_state runs a dummy step() to create some, which
        with weight decay moves the weights. Resumed state travels with broadcast_object.
        """
        hvd = _horovod()
        handles = []
        for name, tensor in model.state_dict().items():
            if name in exclude:
                continue
            carrier = _carrier(tensor)
            handles.append((tensor, carrier, hvd.broadcast_async_(carrier, root_rank=0, name=f"bcast.{name}")))
        for tensor, carrier, handle in handles:
            hvd.synchronize(handle)
            if carrier is not tensor:
                tensor.copy_(carrier)

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average floating-point buffers (batch norm's running statistics) across ranks.

        Each rank's statistics come from its own batches; averaged, every rank validates
        with the same model and the checkpoint holds the statistics all ranks used.
        """
        hvd = _horovod()
        handles = []
        for name, tensor in model.named_buffers():
            if tensor.is_floating_point():
                carrier = _carrier(tensor)
                handles.append((tensor, carrier, hvd.allreduce_async_(carrier, op=hvd.Average, name=f"buf.{name}")))
        for tensor, carrier, handle in handles:
            hvd.synchronize(handle)
            if carrier is not tensor:
                tensor.copy_(carrier)

    def broadcast_object(self, obj, name: str = "object"):
        return _horovod().broadcast_object(obj, root_rank=0, name=name)

    def allgather_object(self, obj, name: str = "object") -> list:
        return _horovod().allgather_object(obj, name=name)

    # --- collectives on tensors ----------------------------------------------------------
    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        hvd = _horovod()
        return hvd.allreduce(tensor, op=hvd.Sum, name=name)

    def allreduce_max(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        hvd = _horovod()
        return hvd.allreduce(tensor, op=hvd.Max, name=name)

    def allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Concatenate along dim 0 across ranks (the ranks' row counts may differ).
        Differentiable, but Horovod's backward pass *averages* the gradient over the
        ranks before returning each rank its own rows."""
        return _horovod().allgather(tensor, name=name)

    def reducescatter_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Sum across ranks; each rank keeps a slice of dim 0, the first (rows % size)
        ranks one row more than the others."""
        hvd = _horovod()
        return hvd.reducescatter(tensor, op=hvd.Sum, name=name)

    def gather_to_root(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0 (rank order) on rank 0 only; the
        others get an empty tensor. Unlike allgather, only rank 0 ever holds the whole."""
        splits = torch.zeros(self.size, dtype=torch.int32)
        splits[0] = tensor.shape[0]
        out, _ = _horovod().alltoall(tensor.detach(), splits=splits, name=name)
        return out

    def scatter_from_root(self, tensor: torch.Tensor, counts: list[int], name: str) -> torch.Tensor:
        """Rank 0's tensor cut along dim 0 into ``counts[r]`` rows for rank r; each rank
        gets its rows. The other ranks pass an empty tensor of the same dtype and trailing shape."""
        splits = torch.tensor(counts if self.is_main else [0] * self.size, dtype=torch.int32)
        out, _ = _horovod().alltoall(tensor.detach(), splits=splits, name=name)
        return out

    def barrier(self) -> None:
        _horovod().barrier()

    # --- the optimizer --------------------------------------------------------------------
    def distributed_optimizer(self, optimizer, model, *, backward_passes_per_step: int,
                              fp16_allreduce: bool, adasum: bool, predivide: float,
                              exclude: set[str] | frozenset[str] = frozenset()):
        """Wrap an optimizer so that gradients are averaged across ranks every
        ``backward_passes_per_step`` backward passes.

        Parameters named in ``exclude`` are left out of the allreduce: each rank owns
        its own copy (the shards of a model-parallel layer).
        """
        hvd = _horovod()
        # Horovod wants a name for every parameter the optimizer holds, and hooks an
        # allreduce onto each one that requires grad when the wrapper is built; the
        # excluded ones are hidden from it by not requiring grad for that moment.
        hidden = [p for n, p in model.named_parameters() if n in exclude and p.requires_grad]
        for p in hidden:
            p.requires_grad_(False)
        try:
            return hvd.DistributedOptimizer(
                optimizer,
                named_parameters=list(model.named_parameters()),
                compression=_carried(hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none),
                backward_passes_per_step=backward_passes_per_step,
                op=hvd.Adasum if adasum else hvd.Average,
                gradient_predivide_factor=predivide,
            )
        finally:
            for p in hidden:
                p.requires_grad_(True)

    def sync_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        """Replace every BatchNorm layer with Horovod's synchronised one."""
        hvd = _horovod()

        def convert(module):
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                new = hvd.SyncBatchNorm(module.num_features, module.eps, module.momentum,
                                        module.affine, module.track_running_stats)
                if module.affine:
                    new.weight.data.copy_(module.weight.data)
                    new.bias.data.copy_(module.bias.data)
                if module.track_running_stats:
                    new.running_mean.copy_(module.running_mean)
                    new.running_var.copy_(module.running_var)
                    new.num_batches_tracked.copy_(module.num_batches_tracked)
                return new
            for child_name, child in module.named_children():
                module.add_module(child_name, convert(child))
            return module

        return convert(model)

    def start_timeline(self, path: str) -> None:
        _horovod().start_timeline(path, mark_cycles=False)

    def stop_timeline(self) -> None:
        _horovod().stop_timeline()

    def nccl_built(self) -> bool:
        return bool(_horovod().nccl_built())


def _carrier(tensor: torch.Tensor) -> torch.Tensor:
    """What Horovod 0.28 can send: it cannot reduce bfloat16 (an fp32 copy is exact) and
    needs contiguous memory (channels-last weights are not). Other tensors go as they are."""
    if tensor.dtype == torch.bfloat16:
        return tensor.float().contiguous()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _carried(base):
    """A Horovod compression that sends gradients through ``_carrier`` around ``base``."""

    class Carried:
        @staticmethod
        def compress(tensor):
            compressed, ctx = base.compress(_carrier(tensor))
            return compressed, (ctx, tensor.dtype)

        @staticmethod
        def decompress(tensor, ctx):
            inner, dtype = ctx
            return base.decompress(tensor, inner).to(dtype)

    return Carried


def _horovod():
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise EngineError(f"Horovod is not installed in this environment ({e}); run `make setup`") from None
    return hvd


def launcher_rank() -> int:
    """This process's rank as the launcher (mpirun, srun, horovodrun) set it; 0 when alone.
    Known before Horovod starts, so errors found early are printed once, not once per rank."""
    for key in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0
