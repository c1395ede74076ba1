"""Numeric precision of the forward and backward passes, and loss scaling."""
from __future__ import annotations

import contextlib

import torch


class Precision:
    def __init__(self, device: torch.device):
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)

    def autocast(self):
        return contextlib.nullcontext()

    def input(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer) -> bool:
        """Unscale the synchronised gradients and step; False when the step was skipped."""
        self.scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            self.scaler.step(optimizer)
        self.scaler.update()
        return True

    def scalars(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
