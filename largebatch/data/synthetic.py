"""Random tensors shaped like the real input: for smoke tests, benchmarks, and class
counts no data set has (1M classes). Nothing to decode, so it measures the model alone."""

from __future__ import annotations

import torch

from ..config import Config
from .checks import batches_per_epoch
from .sampler import mix


class SyntheticInput:
    def __init__(self, cfg: Config, rank: int, size: int, device: torch.device):
        self.cfg = cfg
        self.num_classes = cfg.data.num_classes or 1000
        self.batches_per_epoch = batches_per_epoch(cfg, size, cfg.data.synthetic_size, "--synthetic-size")
        self.val_batches = max(1, cfg.data.synthetic_size // 4 // size // cfg.data.val_batch_size)
        g = torch.Generator().manual_seed(mix(cfg.run.seed, rank))
        # A small pool, reused: generating fresh tensors every step would time the RNG.
        shape = (4, cfg.schedule.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
        self.images = torch.randn(shape, generator=g).to(device)
        self.labels = torch.randint(0, self.num_classes, shape[:2], generator=g).to(device)
        self.bad_files: set[str] = set()

    def train(self, epoch: int, start_batch: int = 0):
        for i in range(start_batch, self.batches_per_epoch):
            yield self.images[i % 4], self.labels[i % 4]

    def val(self):
        n = self.cfg.data.val_batch_size
        for i in range(self.val_batches):
            yield self.images[i % 4][:n], self.labels[i % 4][:n]
