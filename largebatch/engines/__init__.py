"""Distributed engines: the only package that imports Horovod or torch.distributed.

Two engines: ``horovod`` (horovod.py) and ``torch`` (torch.py: torch.distributed and DDP).
The job asks for one by name and talks to it through ``Engine`` (base.py): ranks,
collectives on tensors of any dtype and memory layout, Python objects, the start-up
broadcast, and the reduction of each step's gradients (``Gradients``).
"""

from __future__ import annotations

import os

from .base import Engine, EngineError, Gradients, lost_peer


def choose(name: str) -> tuple[str, str]:
    """The engine ``--engine name`` means here, and a note when ``auto`` had to fall back.

    auto: torch under torchrun (its environment says so); Horovod under mpirun, horovodrun
    or srun when Horovod imports; otherwise torch."""
    if name != "auto":
        return name, ""
    from .torch import torchrun_env

    if torchrun_env():
        return "torch", ""
    try:
        import horovod.torch  # noqa: F401
    except ImportError as e:
        return "torch", f"Horovod does not import here ({e}); using the torch engine"
    return "horovod", ""


def init_engine(name: str = "horovod", timeline: bool = False, use_gpu: bool = True) -> Engine:
    """Start the engine ``name`` ("horovod" or "torch"; see ``choose`` for "auto")."""
    if name == "horovod":
        from .horovod import HorovodEngine

        return HorovodEngine.init(timeline=timeline)
    if name == "torch":
        from .torch import TorchEngine

        return TorchEngine.init(use_gpu=use_gpu)
    raise EngineError(f"unknown engine {name!r}")


def launcher_rank() -> int:
    """This process's rank as the launcher (mpirun, srun, horovodrun, torchrun) set it; 0 when alone.
    Known before any engine starts, so errors found early are printed once, not once per rank."""
    for key in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


__all__ = ["Engine", "EngineError", "Gradients", "choose", "init_engine", "launcher_rank", "lost_peer"]
