"""The network: any torchvision classification model, built by name."""
from __future__ import annotations

import socket
from pathlib import Path

import torch
import torchvision

from .argparsing import UsageError

# Models whose training-mode output carries auxiliary heads; the job wants plain logits.
_NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True},
           "inception_v3": {"aux_logits": False, "init_weights": True}}


def build_model(name: str, num_classes: int, pretrained: bool = False) -> torch.nn.Module:
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_NO_AUX.get(name, {}))
    if pretrained:
        load_pretrained(model, name)
    return model


def pretrained_file(name: str) -> tuple[str, Path]:
    """torchvision's default weights for ``name``: their URL and where torch hub caches them."""
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UsageError(f"--pretrained: torchvision has no trained weights for {name}") from None
    return weights.url, Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_pretrained(model: torch.nn.Module, name: str, timeout: float = 30.0) -> None:
    """Load torchvision's weights from the torch hub cache, downloading them there first when
    they are missing and the network allows; every tensor whose shape differs (the classifier
    of a model with another number of classes) keeps its fresh value. One line when the
    weights are neither cached nor downloadable (compute nodes often have no network)."""
    url, path = pretrained_file(name)
    if not path.is_file():
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # no network: fail within seconds, not hang
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as e:  # any failure to fetch means the same to the user
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--pretrained: torchvision's {name} weights are not in {path.parent} and cannot be "
                             f"downloaded ({reason}); copy {url} there (or set TORCH_HOME)") from None
        finally:
            socket.setdefaulttimeout(previous)
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
