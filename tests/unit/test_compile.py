"""--compile: the compiled module is only the forward pass's; the state stays plain.

Most tests compile with the ``aot_eager`` backend (Dynamo's capture and AOTAutograd, no code
generation: seconds, not the minutes Inductor's C++ builds take on a 2-core machine); one
runs Inductor itself, on a model of a few layers."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from largebatch import job
from largebatch.config import parse_config
from largebatch.engines.base import Engine, Gradients
from largebatch.metrics import Meter
from largebatch.precision import Policy, Precision
from largebatch.train import train_step


class LocalEngine(Engine):
    """One process, no communication: just enough engine for build_state."""

    name = "local"

    def gradients(self, optimizer, model, **kwargs):
        return Gradients(optimizer, model)

    def broadcast_model(self, model, exclude=frozenset()):
        pass

    def broadcast_object(self, obj, name="object"):
        return obj

    def allgather_object(self, obj, name="object"):
        return [obj]


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv("LARGEBATCH_COMPILE_BACKEND", "aot_eager")


def state_for(flags, model=None):
    cfg = parse_config(
        [
            "--synthetic",
            "--model",
            "resnet18",
            "--image-size",
            "8",
            "--batch-size",
            "4",
            "--warmup-epochs",
            "0",
            "--epochs",
            "1",
            "--base-op",
            "lars",
            *flags,
        ]
    )
    engine = LocalEngine(0, 1, 0, 1)
    state = job.build_state(cfg, engine, torch.device("cpu"), 10, 5, model=model if model is not None else tiny())
    state.start(None)
    return state


def test_compile_flag_modes():
    assert parse_config(["--synthetic"]).numerics.compile is None
    assert parse_config(["--synthetic", "--compile"]).numerics.compile == "default"
    assert parse_config(["--synthetic", "--compile", "max-autotune"]).numerics.compile == "max-autotune"
    assert parse_config(["--synthetic", "--compile", "reduce-overhead"]).to_dict()["compile"] == "reduce-overhead"


def test_state_dict_has_no_compile_prefix(aot_eager):
    state = state_for(["--compile", "--channels-last"])
    assert isinstance(state.gradients.module, torch._dynamo.eval_frame.OptimizedModule)
    assert state.model is state.gradients.module._orig_mod  # the forward pass's module wraps the state's
    batch = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    train_step(state, batch, Meter(torch.device("cpu")))
    checkpoint = state.state_dict()
    assert checkpoint["model"].keys() == tiny().state_dict().keys()
    assert not [k for k in checkpoint["model"] if "_orig_mod" in k]
    fresh = state_for([])  # an uncompiled run loads it, and vice versa
    fresh.load_state_dict(checkpoint)
    state.load_state_dict(fresh.state_dict())


@pytest.mark.parametrize(
    "policy",
    [
        Policy("O2-bf16", cast_model=torch.bfloat16, master_weights=True, keep_bn_fp32=True),  # O2's path, in bf16
        Policy("bf16", cast_model=torch.bfloat16, keep_bn_fp32=False),
        Policy("amp-bf16", autocast=torch.bfloat16),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_forward_matches_eager(aot_eager, policy, channels_last):
    """Same loss and gradients as the eager forward pass, for cast weights (O2's functional_call
    with parameter identities through the compiled wrapper) and whole-model casts."""
    results = []
    for compiled in (False, True):
        model = tiny()
        precision = Precision(torch.device("cpu"), policy, channels_last)
        model = precision.prepare(model)
        gradients = Gradients(torch.optim.SGD(model.parameters(), lr=0.1), model)
        if compiled:
            job.compile_forward(gradients, "default")
        torch.manual_seed(1)
        images = torch.randn(4, 3, 8, 8)
        for _ in range(2):  # the second pass reuses the compiled graph (and its guards hold)
            loss = nn.functional.cross_entropy(precision.forward(gradients.module, images).float(), torch.arange(4))
            precision.backward(loss)
        results.append(
            (loss.detach(), [p.grad.clone() for p in model.parameters()], [p.dtype for p in model.parameters()])
        )
    (l0, g0, d0), (l1, g1, d1) = results
    assert d0 == d1
    assert torch.allclose(l0, l1, rtol=1e-2), (l0, l1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a.float(), b.float(), rtol=5e-2, atol=1e-2)


def test_inductor_compiles_a_tiny_model(monkeypatch, capsys):
    """The default backend, for real (a C++ compiler is needed on CPU): a few layers, fp32."""
    monkeypatch.delenv("LARGEBATCH_COMPILE_BACKEND", raising=False)
    model = tiny()
    gradients = Gradients(torch.optim.SGD(model.parameters(), lr=0.1), model)
    job.compile_forward(gradients, "default")
    images = torch.randn(4, 3, 8, 8)
    t0 = time.monotonic()
    out = gradients.module(images)
    out.sum().backward()
    with capsys.disabled():
        print(f"\ninductor: first forward + backward of a 6-layer model took {time.monotonic() - t0:.1f} s")
    eager = tiny()
    assert torch.allclose(out, eager(images), rtol=1e-4, atol=1e-5)
