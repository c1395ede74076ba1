"""He et al.'s ResNets for small images (largebatch/small_resnet.py), as the job builds them."""

import pytest
import torch

from largebatch.config import UsageError, parse_config
from largebatch.model import build_model, check_input


@pytest.mark.parametrize("depth, params", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_parameter_counts_are_the_papers(depth, params):
    # Table 6 of "Deep Residual Learning for Image Recognition" (CIFAR-10, 10 classes).
    model = build_model(f"cifar_resnet{depth}", 10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.03)


def test_takes_small_images_and_trains():
    model = build_model("cifar_resnet8", 4)
    check_input(model, "cifar_resnet8", image_size=8, batch_size=4, shared_bn=False)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 4  # the head the job replaces


def test_names_in_flags(tmp_path):
    base = ["--train-dir", str(tmp_path), "--val-dir", str(tmp_path)]
    assert parse_config(base + ["--model", "cifar_resnet20"], "folder").model.model == "cifar_resnet20"
    with pytest.raises(UsageError, match="not a torchvision classification model or a cifar_resnet"):
        parse_config(base + ["--model", "cifar_resnet21"], "folder")
    with pytest.raises(UsageError, match="no trained weights for cifar_resnet8"):
        build_model("cifar_resnet8", 10, pretrained=True)
