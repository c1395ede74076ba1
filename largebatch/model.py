"""The network: any torchvision classification model, built by name, and the checks of what
it can be fed that are cheaper at start than as a traceback at the first step."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torchvision

from . import batchnorm, small_resnet
from .argparsing import UsageError

# Models whose training-mode output carries auxiliary heads; the job wants plain logits.
_NO_AUX = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def build_model(
    name: str, num_classes: int, pretrained: bool = False, zero_init_residual: bool = False
) -> torch.nn.Module:
    if small_resnet.is_small_resnet(name):
        if pretrained:
            raise UsageError(f"--pretrained: there are no trained weights for {name}")
        model: torch.nn.Module = small_resnet.build(name, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_NO_AUX.get(name, {}))
    if pretrained:
        load_pretrained(model, name)
    if zero_init_residual:
        batchnorm.zero_init_residual(model, name)
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
            raise UsageError(
                f"--pretrained: torchvision's {name} weights are not in {path.parent} and cannot be "
                f"downloaded ({reason}); copy {url} there (or set TORCH_HOME)"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_input(model: torch.nn.Module, name: str, image_size: int, batch_size: int, shared_bn: bool) -> None:
    """Refuse, in one line, what this model would fail on at its first step: a batch of one
    image through batch norm (it normalises each batch by the batch's own statistics, which
    one image does not have: an error at small sizes, noise otherwise; ``shared_bn``: the
    statistics are taken over every rank's batch, --sync-bn), and an image size it cannot take
    (pooling shrinks the image to nothing, or a ViT's fixed size). The size is tried with one
    image in eval mode, which changes nothing in the model (not even batch norm statistics)."""
    if batch_size == 1 and has_batchnorm(model) and not shared_bn:
        raise UsageError(
            f"--batch-size 1 cannot train {name}: its batch norm layers need at least 2 images per "
            f"batch; use --batch-size 2 or more"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError) as e:
        lines = str(e).strip().splitlines()
        reason = lines[0].strip() if lines else type(e).__name__
        raise UsageError(
            f"--model {name} cannot take --image-size {image_size} images ({reason[:200]}); "
            f"choose another --image-size or --model"
        ) from None
    finally:
        model.train(was_training)
