"""The network: any torchvision classification model, built by name, and the checks of what
it can be fed that are cheaper at start than as a traceback at the first step."""
from __future__ import annotations

import torch
import torchvision

from .config import UsageError

# Models whose training-mode output carries auxiliary heads; the job wants plain logits.
_NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True},
           "inception_v3": {"aux_logits": False, "init_weights": True}}


def build_model(name: str, num_classes: int) -> torch.nn.Module:
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_NO_AUX.get(name, {}))


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
        raise UsageError(f"--batch-size 1 cannot train {name}: its batch norm layers need at least 2 images per "
                         f"batch; use --batch-size 2 or more")
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
        raise UsageError(f"--model {name} cannot take --image-size {image_size} images ({reason[:200]}); "
                         f"choose another --image-size or --model") from None
    finally:
        model.train(was_training)
