"""torch.distributed + DistributedDataParallel: torchrun, or mpirun/srun without torchrun.

Rendezvous, in order of what the environment shows:
* torchrun (or ``python -m torch.distributed.launch``): its RANK, WORLD_SIZE, MASTER_ADDR...
* mpirun, or srun with PMIx: ranks from MPI (mpi4py); rank 0 names its host and a free port.
* srun without MPI: SLURM's task variables; the first host of the step's node list, and a
  port derived from the job id (every task computes the same one).
* none of these: one process.

One process group serves both kinds of tensor: Gloo for CPU tensors (the loop's small
reductions, objects) and NCCL for CUDA tensors when the run uses GPUs.

Gradients are averaged by DDP: bucketed allreduces that start during the backward pass.
Micro-batches before the last run under ``no_sync`` (no communication); a communication
hook does --gradient-predivide-factor and --fp16-allreduce (bf16 where asked).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
import socket
import subprocess
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .base import Engine, EngineError, Gradients, carrier, shard_range

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "MPI_LOCALNRANKS")


def torchrun_env() -> bool:
    """Started by torchrun or torch.distributed.launch (they set these for every worker)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous() -> tuple[str, int, int, int, int]:
    """(init_method, rank, size, local_rank, local_size) for this process."""
    env = os.environ
    if torchrun_env():
        size = int(env["WORLD_SIZE"])
        return ("env://", int(env["RANK"]), size, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", size)))
    if any(k in env for k in MPI_VARS):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise EngineError(f"the torch engine under mpirun needs mpi4py to agree on an address ({e})") from None
        world = MPI.COMM_WORLD
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        host, port = world.bcast((socket.gethostname(), _free_port()) if world.Get_rank() == 0 else None, root=0)
        return (f"tcp://{host}:{port}", world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size())
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        first = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        port = 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        size = int(env["SLURM_NTASKS"])
        return (
            f"tcp://{first}:{port}",
            int(env["SLURM_PROCID"]),
            size,
            int(env.get("SLURM_LOCALID", 0)),
            int(env.get("SLURM_NTASKS_PER_NODE", str(size)).split("(")[0]),
        )
    return f"tcp://127.0.0.1:{_free_port()}", 0, 1, 0, 1


def _compression_hook(state, bucket):
    """DDP's allreduce with Horovod's --gradient-predivide-factor f (divide by f before the
    sum, by size/f after) and an optional cast of the sent values (fp16 or bf16)."""
    factor, size, dtype = state
    grads = bucket.buffer()
    sent = grads.div(factor).to(dtype) if dtype is not None else grads.div_(factor)
    future = dist.all_reduce(sent, async_op=True).get_future()

    def finish(fut):
        grads.copy_(fut.value()[0].div_(size / factor))
        return grads

    return future.then(finish)


class TorchGradients(Gradients):
    """DDP reduces during the backward pass of the last micro-batch; the others run under
    ``no_sync`` so that nothing is sent for them."""

    module: DistributedDataParallel

    def backward(self, last: bool):
        return contextlib.nullcontext() if last else self.module.no_sync()


def _fix_bucket_layout(ddp: DistributedDataParallel) -> None:
    """Lay out DDP's gradient buckets now, for good. DDP otherwise reduces the first step in
    one bucket and rebuilds the layout after it from the order gradients became ready; a
    resumed run's first step then sums in another layout than the uninterrupted run's same
    step, and on 3 or more ranks the allreduce's summation order follows the layout, so the
    weights differed in the last bits. (DDP's own join hook rebuilds the same way.)"""
    reducer = ddp.reducer
    if hasattr(reducer, "_push_all_rebuilt_params") and hasattr(reducer, "_rebuild_buckets"):
        reducer._push_all_rebuilt_params()
        reducer._rebuild_buckets()


class TorchEngine(Engine):
    name = "torch"
    features = frozenset({"bf16_allreduce"})

    def __init__(self, rank, size, local_rank, local_size, device_type: str = "cpu"):
        super().__init__(rank, size, local_rank, local_size)
        self.device_type = device_type

    @classmethod
    def init(cls, use_gpu: bool) -> TorchEngine:
        init_method, rank, size, local_rank, local_size = _rendezvous()
        backend = "gloo"
        if use_gpu and torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=size, timeout=datetime.timedelta(minutes=30)
        )
        return cls(rank, size, local_rank, local_size, "cuda" if "nccl" in backend else "cpu")

    # --- model ------------------------------------------------------------------------------
    def _each(self, tensors, op) -> None:
        for tensor in tensors:
            c = carrier(tensor)
            op(c)
            if c is not tensor:
                tensor.copy_(c)

    def broadcast_model(self, model, exclude=frozenset()) -> None:
        self._each((t for n, t in model.state_dict().items() if n not in exclude), lambda c: dist.broadcast(c, 0))

    def average_buffers(self, model) -> None:
        def average(c):
            dist.all_reduce(c)
            c.div_(self.size)

        self._each((t for _, t in model.named_buffers() if t.is_floating_point()), average)

    def gradients(
        self, optimizer, model, *, micro_batches, compression, adasum, predivide, exclude=frozenset()
    ) -> Gradients:
        if self.size == 1 and compression is None:
            # One process: nothing to average, and DDP would still copy every gradient into its
            # buckets and reduce them over the one rank (a --gradient-predivide-factor is undone
            # exactly after that reduction anyway). A compression asked for still rounds.
            return Gradients(optimizer, model)
        if exclude:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(exclude))
        on_gpu = next(model.parameters()).is_cuda
        # Buffers are averaged at epoch ends (average_buffers), as under Horovod, not
        # broadcast from rank 0 before every forward pass (torch >= 2.15 renamed the switch).
        no_buffer_sync: dict[str, Any] = (
            {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}
        )
        ddp = DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if on_gpu else None, **no_buffer_sync
        )
        if compression is not None or predivide != 1.0:
            ddp.register_comm_hook((predivide, self.size, compression), _compression_hook)
        _fix_bucket_layout(ddp)
        return TorchGradients(optimizer, ddp)

    def sync_batchnorm(self, model):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # --- objects --------------------------------------------------------------------------
    def broadcast_object(self, obj, name="object"):
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def allgather_object(self, obj, name="object") -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    # --- tensors --------------------------------------------------------------------------
    def _reduce(self, tensor, op):
        c = carrier(tensor).clone()
        dist.all_reduce(c, op=op)
        return c.to(tensor.dtype)

    def allreduce_sum(self, tensor, name):
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def allreduce_max(self, tensor, name):
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _rows(self, tensor) -> list[int]:
        counts = torch.tensor([tensor.shape[0]], device=tensor.device)
        everyone = [torch.zeros_like(counts) for _ in range(self.size)]
        dist.all_gather(everyone, counts)
        return [int(c) for c in everyone]

    @staticmethod
    def _padded(tensor, rows: int):
        if tensor.shape[0] == rows:
            return tensor
        pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
        return torch.cat([tensor, pad])

    def allgather(self, tensor, name):
        # all_gather moves equal shapes: pad every rank's rows to the longest, then trim.
        c = carrier(tensor)
        counts = self._rows(c)
        parts = [c.new_empty((max(counts), *c.shape[1:])) for _ in counts]
        dist.all_gather(parts, self._padded(c, max(counts)).contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(tensor.dtype)

    def reducescatter_sum(self, tensor, name):
        # Gloo has no reduce-scatter; a full sum and this rank's slice are exact and simple.
        total = self.allreduce_sum(tensor, name)
        start, end = shard_range(tensor.shape[0], self.size, self.rank)
        return total[start:end]

    def gather_to_root(self, tensor, name):
        c = carrier(tensor.detach())
        counts = self._rows(c)
        parts = [c.new_empty((max(counts), *c.shape[1:])) for _ in counts] if self.is_main else None
        dist.gather(self._padded(c, max(counts)).contiguous(), parts, dst=0)
        if not self.is_main:
            return c.new_empty((0, *c.shape[1:])).to(tensor.dtype)
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(tensor.dtype)

    def scatter_from_root(self, tensor, counts, name):
        c = carrier(tensor.detach())
        rows = max(counts)
        out = c.new_empty((rows, *c.shape[1:]))
        parts = None
        if self.is_main:
            parts = [self._padded(piece, rows).contiguous() for piece in torch.split(c, counts)]
        dist.scatter(out, parts, src=0)
        return out[: counts[self.rank]].to(tensor.dtype)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        # Left to the interpreter's exit, Gloo's worker threads can drop their last tensor
        # after Python has finalised: "terminate called without an active exception", and a
        # finished run exits 134 (seen now and then in the CPU tests; pytorch/pytorch#190489).
        # Collected first, the run's DDP model no longer holds the group, so destroying it
        # joins those threads here.
        if dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
