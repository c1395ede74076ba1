"""Which samples each rank reads, in which order, from which position.

Training: a permutation seeded by (seed, epoch), cut into ``size`` equal shares (the
remainder, fewer than ``size`` samples, sits out this epoch), so every rank runs the same
number of batches and every used sample is read exactly once. The position within the
share is explicit, so a resumed run continues the same order mid-epoch.

Validation: rank r reads samples r, r + size, ...: every image exactly once over all ranks,
no padding with duplicates, so the reduced accuracy equals a single-process evaluation.

Each item is ``(index, sample_seed)``: the dataset seeds its augmentation from it, which
makes a sample's crop a function of (seed, epoch, index) alone, whichever worker reads it.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

_MIX = 1_000_003  # changing it changes the data order and augmentation of every run, resumed ones too


def mix(seed: int, *parts: int) -> int:
    """One seed from --seed and further numbers: mix(seed, epoch) orders an epoch's data,
    mix(seed, rank) a rank's synthetic tensors. The one place they are combined, so every
    random choice follows from --seed alone, the same in every module."""
    for part in parts:
        seed = seed * _MIX + part
    return seed


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A sample's augmentation seed: a function of (seed, epoch, index) only, whichever
    rank or loader process reads it."""
    return mix(seed, epoch, index) % (2**63)


class TrainShard(Sampler):
    def __init__(self, num_samples: int, rank: int, size: int, seed: int, epoch: int, start: int = 0):
        self.per_rank = num_samples // size
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(mix(seed, epoch)))
        self.indices = order[rank * self.per_rank : (rank + 1) * self.per_rank][start:].tolist()
        self.seed, self.epoch = seed, epoch

    def __iter__(self):
        return ((i, sample_seed(self.seed, self.epoch, i)) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ValShard(Sampler):
    def __init__(self, num_samples: int, rank: int, size: int):
        self.indices = list(range(rank, num_samples, size))

    def __iter__(self):
        return ((i, 0) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)
