"""Each precision level's mapping: where parameters, master weights, batch norm and the
forward pass end up; the loss scaler's arithmetic."""

import pytest
import torch
import torchvision

from largebatch.precision import LEVELS, PRECISIONS, LossScaler, Precision, resolve_policy

CPU = torch.device("cpu")


def tiny_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def forward_dtypes(precision, model):
    """dtype of the first conv's weight as used, the first BN's output, and the logits."""
    seen = {}

    def record(key):
        def hook(module, inputs, output):  # returns None: a returned value would replace the output
            seen.setdefault(key, output.dtype)

        return hook

    model.conv1.register_forward_hook(record("conv"))
    model.bn1.register_forward_hook(record("bn_out"))
    seen["logits"] = precision.forward(model, torch.randn(2, 3, 32, 32)).dtype
    return seen


@pytest.mark.parametrize(
    "name, params, bn_params, conv, logits",
    [
        ("O0", torch.float32, torch.float32, torch.float32, torch.float32),
        ("O1", torch.float32, torch.float32, torch.float16, torch.float16),
        ("O2", torch.float32, torch.float32, torch.float16, torch.float16),
        ("O3", torch.float16, torch.float16, torch.float16, torch.float16),
    ],
)
def test_opt_level_mapping(name, params, bn_params, conv, logits):
    precision = Precision(CPU, resolve_policy(None, name, None, None))
    model = precision.prepare(tiny_resnet())
    assert model.conv1.weight.dtype == params and model.fc.weight.dtype == params
    assert model.bn1.weight.dtype == bn_params and model.bn1.running_mean.dtype == bn_params
    seen = forward_dtypes(precision, model)
    assert (seen["conv"], seen["logits"]) == (conv, logits)
    assert (precision.scaler is not None) == (name in ("O1", "O2"))


def test_o2_master_weights_receive_fp32_gradients_and_bn_stays_fp32():
    precision = Precision(CPU, LEVELS["O2"])
    model = precision.prepare(tiny_resnet())
    before = model.bn1.running_mean.clone()
    precision.forward(model, torch.randn(4, 3, 32, 32)).float().sum().backward()
    assert model.conv1.weight.grad.dtype == torch.float32  # through the fp16 cast's backward
    assert model.bn1.weight.grad.dtype == torch.float32
    assert not torch.equal(before, model.bn1.running_mean), "BN statistics were not updated in place"


def test_keep_batchnorm_fp32_overrides():
    o3 = Precision(CPU, resolve_policy(None, "O3", True, None))
    model = o3.prepare(tiny_resnet())
    assert model.conv1.weight.dtype == torch.float16 and model.bn1.weight.dtype == torch.float32
    assert forward_dtypes(o3, model)["logits"] == torch.float16
    o2 = Precision(CPU, resolve_policy(None, "O2", False, None))
    model = o2.prepare(tiny_resnet())
    assert forward_dtypes(o2, model)["bn_out"] == torch.float16  # BN computes with the fp16 copy ...
    assert model.bn1.weight.dtype == torch.float32  # ... of the master, which stays fp32


@pytest.mark.parametrize(
    "name, params, logits",
    [
        ("fp32", torch.float32, torch.float32),
        ("amp", torch.float32, torch.float16),
        ("amp-bf16", torch.float32, torch.bfloat16),
        ("fp16", torch.float16, torch.float16),
        ("bf16", torch.bfloat16, torch.bfloat16),
    ],
)
def test_precision_names(name, params, logits):
    precision = Precision(CPU, resolve_policy(name, None, None, None))
    model = precision.prepare(tiny_resnet())
    assert model.conv1.weight.dtype == params
    assert forward_dtypes(precision, model)["logits"] == logits
    assert PRECISIONS[name].needs_gpu == (torch.float16 in (params, logits))


def test_channels_last():
    precision = Precision(CPU, LEVELS["O0"], channels_last=True)
    model = precision.prepare(tiny_resnet())
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = {}

    def hook(module, inputs):
        seen["nhwc"] = inputs[0].is_contiguous(memory_format=torch.channels_last)

    model.conv1.register_forward_pre_hook(hook)
    precision.forward(model, torch.randn(2, 3, 32, 32))
    assert seen["nhwc"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("amp", "O1", None, None), "not both"),
        ((None, "O1", True, None), "--keep-batchnorm-fp32 applies"),
        (("bf16", None, None, "dynamic"), "needs none"),
        ((None, "O2", None, "-4"), "positive"),
        ((None, "O2", None, "lots"), "'dynamic' or a positive number"),
    ],
)
def test_contradictory_precision_flags(args, message):
    with pytest.raises(ValueError, match=message):
        resolve_policy(*args)


def test_static_loss_scale_and_o3_default():
    assert resolve_policy(None, "O3", None, None).loss_scale is None  # Apex O3: no scaling by default
    assert resolve_policy(None, "O3", None, "128").loss_scale == 128.0
    assert resolve_policy("amp", None, None, "dynamic").loss_scale == "dynamic"


def test_loss_scaler_unscales_detects_overflow_and_adapts():
    scaler = LossScaler(1024.0, dynamic=True, device=CPU, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))  # O3 has fp16 gradients
    p.grad, q.grad = torch.full((3,), 2048.0), torch.full((2,), 512.0, dtype=torch.float16)
    found = scaler.unscale_([p, q])
    assert found.item() == 0 and torch.equal(p.grad, torch.full((3,), 2.0)) and q.grad[0].item() == 0.5
    scaler.update(found)
    scaler.update(found)
    assert scaler.scale.item() == 2048.0  # doubled after growth_interval clean steps
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    found = scaler.unscale_([p])
    assert found.item() > 0
    scaler.update(found)
    assert scaler.scale.item() == 1024.0
    restored = LossScaler(1.0, dynamic=True, device=CPU)
    restored.load_state_dict(scaler.state_dict())
    assert restored.scale.item() == 1024.0
