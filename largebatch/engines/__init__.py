"""Distributed engines: the only package that imports Horovod or torch.distributed.

The job asks for an engine by name and talks to it through ``Engine`` (base.py): ranks,
collectives on tensors of any dtype and memory layout, Python objects, the start-up
broadcast, and the reduction of each step's gradients (``Gradients``).
"""
from __future__ import annotations

import os

from .base import Engine, EngineError, Gradients


def init_engine(name: str = "horovod", timeline: bool = False) -> Engine:
    if name != "horovod":
        raise EngineError(f"unknown engine {name!r}")
    from .horovod import HorovodEngine
    return HorovodEngine.init(timeline=timeline)


def launcher_rank() -> int:
    """This process's rank as the launcher (mpirun, srun, horovodrun) set it; 0 when alone.
    Known before any engine starts, so errors found early are printed once, not once per rank."""
    for key in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


__all__ = ["Engine", "EngineError", "Gradients", "init_engine", "launcher_rank"]
