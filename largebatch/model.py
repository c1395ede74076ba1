"""The network: any torchvision classification model, built by name."""
from __future__ import annotations

import torch
import torchvision

# Models whose training-mode output carries auxiliary heads; the job wants plain logits.
_NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True},
           "inception_v3": {"aux_logits": False, "init_weights": True}}


def build_model(name: str, num_classes: int) -> torch.nn.Module:
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_NO_AUX.get(name, {}))
