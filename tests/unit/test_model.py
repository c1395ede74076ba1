"""What the model is fed, checked at start (model.check_input) instead of failing at the
first step with a traceback; and the one-line reason for a collective that lost a peer."""

import pytest
import torch

from largebatch.config import UsageError
from largebatch.engines import lost_peer
from largebatch.model import build_model, check_input


def test_sizes_the_model_takes_pass_and_leave_it_unchanged():
    model = build_model("resnet18", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_input(model, "resnet18", image_size=16, batch_size=2, shared_bn=False)
    assert model.training  # back in training mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too


@pytest.mark.parametrize(
    "name, size, fragment",
    [
        ("vit_b_16", 32, "Expected 224 but got 32"),  # a fixed size
        ("alexnet", 16, "Output size is too small"),  # pooled to nothing
    ],
)
def test_size_the_model_cannot_take_is_refused(name, size, fragment):
    with pytest.raises(UsageError) as err:
        check_input(build_model(name, 10), name, image_size=size, batch_size=8, shared_bn=False)
    message = str(err.value)
    assert message.startswith(f"--model {name} cannot take --image-size {size} images (") and fragment in message
    assert "\n" not in message


def test_batch_of_one_with_batch_norm():
    resnet = build_model("resnet18", 10)
    with pytest.raises(UsageError, match="--batch-size 1 cannot train resnet18: .* use --batch-size 2 or more"):
        check_input(resnet, "resnet18", image_size=16, batch_size=1, shared_bn=False)
    check_input(resnet, "resnet18", image_size=16, batch_size=1, shared_bn=True)  # --sync-bn over ranks
    check_input(build_model("alexnet", 10), "alexnet", image_size=64, batch_size=1, shared_bn=False)  # no BN


@pytest.mark.parametrize(
    "message, reason",
    [
        (
            "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
            "[127.0.0.1]:27024. This is typically caused by a remote worker crashing.",
            "Connection closed by peer [127.0.0.1]:27024",
        ),
        (
            "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:18870: "
            "Connection reset by peer. This is typically caused by a remote worker hanging.",
            "Read error [127.0.0.1]:18870: Connection reset by peer",
        ),
        ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", None),  # a bug: keeps its traceback
        ("Connection reset by peer", None),  # not from a collective
    ],
)
def test_lost_peer(message, reason):
    assert lost_peer(RuntimeError(message)) == reason
    assert lost_peer(OSError(message)) is None
