import copy
import io
import math

import pytest
import torch
from torch import nn

from lars import LAMB, LARS, create_optimizer_lamb, create_optimizer_lars

# Learning rates that change every step: an implementation that multiplies
# the whole momentum buffer by the current lr (torch.optim.SGD style) would
# diverge from the reference after the second step.
LRS = [0.1, 0.5, 0.2, 1.0, 0.05]


class SmallNet(nn.Module):
    """Conv, norm and linear layers: 4-D, 2-D and 1-D parameter shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = SmallNet().double()
    # Non-trivial norm-layer values so that their updates are distinguishable.
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def set_grads(params, step, scale=1.0):
    """Deterministic pseudo-gradients for ``step``, identical across calls."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)


# --------------------------------------------------------------------------
# Reference implementations: plain per-tensor loops straight from the papers.
# --------------------------------------------------------------------------


def reference_lars_step(params, grads, bufs, lr, momentum, wd, eta, eps, trust_clip, adapt, nesterov=False):
    for i, (w, g) in enumerate(zip(params, grads)):
        w_norm = w.norm().item()
        g_norm = g.norm().item()
        if not adapt:
            trust = 1.0
        else:
            if w_norm == 0 or g_norm == 0:
                trust = 1.0
            else:
                trust = eta * w_norm / (g_norm + wd * w_norm + eps)
            if trust_clip is not None:
                trust = min(trust, trust_clip)
        scaled = lr * trust * (g + wd * w)
        bufs[i] = momentum * bufs[i] + scaled
        if nesterov:
            w -= scaled + momentum * bufs[i]
        else:
            w -= bufs[i]


def reference_lamb_step(params, grads, state, lr, betas, eps, wd, trust_clip, adapt):
    beta1, beta2 = betas
    for i, (w, g) in enumerate(zip(params, grads)):
        m, v, t = state[i]
        t += 1
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        u = m_hat / (v_hat.sqrt() + eps) + wd * w
        w_norm = w.norm().item()
        u_norm = u.norm().item()
        trust = w_norm / u_norm if (adapt and w_norm > 0 and u_norm > 0) else 1.0
        if adapt and trust_clip is not None:
            trust = min(trust, trust_clip)
        w -= lr * trust * u
        state[i] = (m, v, t)


# --------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("trust_clip", [None, 0.02])
def test_lars_matches_reference_with_changing_lr(nesterov, trust_clip):
    momentum, wd, eta, eps = 0.9, 0.01, 0.02, 1e-5
    model = make_model()
    ref_model = copy.deepcopy(model)
    opt = create_optimizer_lars(
        model,
        lr=LRS[0],
        momentum=momentum,
        weight_decay=wd,
        bn_bias_separately=True,
        epsilon=eps,
        eta=eta,
        trust_clip=trust_clip,
    )
    for group in opt.param_groups:
        group["nesterov"] = nesterov

    # The same grouping written out by hand for the reference.
    ref_groups = [
        ([p for p in trainable(ref_model) if p.ndim > 1], wd, True),
        ([p for p in trainable(ref_model) if p.ndim <= 1], 0.0, False),
    ]
    ref_bufs = [[torch.zeros_like(p) for p in ps] for ps, _, _ in ref_groups]
    start = [p.detach().clone() for p in trainable(ref_model)]

    for step, lr in enumerate(LRS):
        set_grads(trainable(model), step)
        set_grads(trainable(ref_model), step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        with torch.no_grad():
            for (ps, group_wd, adapt), bufs in zip(ref_groups, ref_bufs):
                reference_lars_step(
                    ps,
                    [p.grad for p in ps],
                    bufs,
                    lr,
                    momentum,
                    group_wd,
                    eta,
                    eps,
                    trust_clip,
                    adapt,
                    nesterov,
                )

    for p, ref, p0 in zip(trainable(model), trainable(ref_model), start):
        # Compare the displacement, not just the weights: with eta << 1 the
        # updates are small and a weight comparison alone would be too lax.
        assert (ref - p0).abs().max() > 1e-4
        torch.testing.assert_close(p - p0, ref - p0, rtol=1e-6, atol=1e-9)


def test_lars_frozen_param_untouched_and_grad_none_skipped():
    model = make_model()
    opt = create_optimizer_lars(model, lr=0.1, momentum=0.9, weight_decay=1e-4, bn_bias_separately=True, epsilon=0.0)
    frozen_before = model.frozen.weight.detach().clone()
    bias_before = model.fc.bias.detach().clone()
    set_grads(trainable(model), 0)
    model.fc.bias.grad = None
    opt.step()
    assert torch.equal(model.frozen.weight, frozen_before)
    assert torch.equal(model.fc.bias, bias_before)
    assert model.fc.bias not in opt.state


def test_lars_zero_norms_use_unit_trust():
    lr, wd, eta = 0.1, 0.01, 0.001
    zero_w = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    zero_g = nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    opt = LARS([zero_w, zero_g], lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    g = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    zero_w.grad = g.clone()
    zero_g.grad = torch.zeros(4, dtype=torch.float64)
    w_before = zero_g.detach().clone()
    opt.step()

    torch.testing.assert_close(opt.last_trust_ratios, torch.ones(2, dtype=torch.float64))
    # First step: the zero-initialised buffer makes v equal the scaled update.
    torch.testing.assert_close(zero_w.detach(), -lr * 1.0 * g)
    # A formula-derived ratio would have been eta / wd here, not 1.
    torch.testing.assert_close(zero_g.detach(), w_before - lr * 1.0 * wd * w_before)


def test_lars_trust_clip_caps_ratio():
    lr, eta, clip = 0.01, 1.0, 2.5
    big = nn.Parameter(torch.full((10,), 10.0, dtype=torch.float64))
    small = nn.Parameter(torch.full((10,), 1.0, dtype=torch.float64))
    opt = LARS([big, small], lr=lr, momentum=0.0, eta=eta, trust_clip=clip)
    big.grad = torch.full((10,), 0.01, dtype=torch.float64)
    small.grad = torch.full((10,), 1.0, dtype=torch.float64)
    raw_big = eta * big.norm().item() / big.grad.norm().item()
    raw_small = eta * small.norm().item() / small.grad.norm().item()
    assert raw_big > clip > raw_small
    big_before, small_before = big.detach().clone(), small.detach().clone()
    opt.step()

    torch.testing.assert_close(opt.last_trust_ratios, torch.tensor([clip, raw_small], dtype=torch.float64))
    torch.testing.assert_close(big.detach(), big_before - lr * clip * big.grad)
    torch.testing.assert_close(small.detach(), small_before - lr * raw_small * small.grad)


def test_lars_trust_clip_also_bounds_zero_norm_fallback():
    # The clip bounds every ratio, the zero-norm fallback of 1 included.
    clip = 0.5
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = LARS([p], lr=0.1, momentum=0.0, trust_clip=clip)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(opt.last_trust_ratios, torch.tensor([clip], dtype=torch.float64))
    torch.testing.assert_close(p.detach(), -0.1 * clip * p.grad)


def test_create_optimizer_lars_groups_bn_and_bias_separately():
    model = make_model()
    wd = 5e-4
    opt = create_optimizer_lars(model, lr=0.1, momentum=0.9, weight_decay=wd, bn_bias_separately=True, epsilon=0.0)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model.conv.weight, model.fc.weight])
    assert ids(no_decay["params"]) == ids([model.conv.bias, model.bn.weight, model.bn.bias, model.fc.bias])
    assert decay["weight_decay"] == wd and decay["lars_adaptation"] is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_adaptation"] is False

    # A no-decay param must follow plain momentum SGD with lr inside the
    # buffer, no weight decay and no trust ratio.
    momentum = 0.9
    w = model.bn.weight.detach().clone()
    v = torch.zeros_like(w)
    for step, lr in enumerate(LRS[:3]):
        set_grads(trainable(model), step)
        for group in opt.param_groups:
            group["lr"] = lr
        v = momentum * v + lr * model.bn.weight.grad
        w = w - v
        opt.step()
    torch.testing.assert_close(model.bn.weight.detach(), w, rtol=1e-12, atol=1e-12)
    # Only the two weight tensors were adapted.
    assert opt.last_trust_ratios.shape == (2,)


def test_create_optimizer_lars_single_group():
    model = make_model()
    opt = create_optimizer_lars(model, lr=0.1, momentum=0.9, weight_decay=1e-4, bn_bias_separately=False, epsilon=0.0)
    assert len(opt.param_groups) == 1
    (group,) = opt.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in trainable(model)}
    assert group["weight_decay"] == 1e-4 and group["lars_adaptation"] is True


def _meta_groups():
    weights = [nn.Parameter(torch.empty(shape, device="meta")) for shape in [(8, 3, 3, 3), (5, 8)]]
    vectors = [nn.Parameter(torch.empty(n, device="meta")) for n in (8, 5)]
    for p in weights + vectors:
        p.grad = torch.empty_like(p)
    return [
        {"params": weights},
        {"params": vectors, "weight_decay": 0.0, "lars_adaptation": False},
    ]


def test_meta_tensors_refuse_host_reads():
    # The no-sync tests below rely on this: on the meta device there is no
    # data, so anything that reads a value back to the host raises.
    t = torch.ones(2, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        t.norm().item()
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(t.sum() > 0)
    with pytest.raises((RuntimeError, NotImplementedError)):
        float(t.sum())


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_step_does_not_sync_with_host(nesterov):
    opt = LARS(
        _meta_groups(), lr=0.1, momentum=0.9, weight_decay=1e-4, epsilon=1e-9, trust_clip=10.0, nesterov=nesterov
    )
    opt.step()
    opt.step()  # second step exercises existing momentum buffers
    assert opt.last_trust_ratios.device.type == "meta"
    assert opt.last_trust_ratios.shape == (2,)


def test_last_trust_ratios_none_before_step():
    p = nn.Parameter(torch.ones(3))
    assert LARS([p], lr=0.1).last_trust_ratios is None
    assert LAMB([p], lr=0.1).last_trust_ratios is None


def _run(opt_factory, model, steps):
    opt = opt_factory(model)
    for step in steps:
        set_grads(trainable(model), step)
        for group in opt.param_groups:
            group["lr"] = LRS[step % len(LRS)]
        opt.step()
    return opt


def _lars_factory(model):
    return create_optimizer_lars(
        model, lr=0.1, momentum=0.9, weight_decay=1e-3, bn_bias_separately=True, epsilon=1e-6, eta=0.05
    )


def _lamb_factory(model):
    return create_optimizer_lamb(model, lr=0.01, weight_decay=1e-2, bn_bias_separately=True)


@pytest.mark.parametrize("factory", [_lars_factory, _lamb_factory], ids=["lars", "lamb"])
def test_state_dict_round_trip_resumes_identically(factory):
    uninterrupted = make_model()
    _run(factory, uninterrupted, range(6))

    first_half = make_model()
    opt = _run(factory, first_half, range(3))
    if factory is _lars_factory:
        assert all("momentum_buffer" in opt.state[p] for p in trainable(first_half))
    buffer = io.BytesIO()
    torch.save({"model": first_half.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = factory(resumed)
    resumed_opt.load_state_dict(checkpoint["opt"])
    for step in range(3, 6):
        set_grads(trainable(resumed), step)
        for group in resumed_opt.param_groups:
            group["lr"] = LRS[step % len(LRS)]
        resumed_opt.step()

    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_lars_reconstructible_from_param_groups():
    # horovod.torch.DistributedOptimizer re-runs the optimizer's __init__ with
    # only its param groups, so lr must not be a mandatory argument there.
    model = make_model()
    opt = _lars_factory(model)
    clone = LARS(opt.param_groups)
    assert [g["lr"] for g in clone.param_groups] == [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError):
        LARS([nn.Parameter(torch.ones(2))])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1.0),
        dict(lr=0.1, momentum=-0.1),
        dict(lr=0.1, weight_decay=-1.0),
        dict(lr=0.1, eta=-1.0),
        dict(lr=0.1, epsilon=-1.0),
        dict(lr=0.1, trust_clip=0.0),
        dict(lr=0.1, momentum=0.0, nesterov=True),
    ],
)
def test_lars_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        LARS([nn.Parameter(torch.ones(2))], **kwargs)


# --------------------------------------------------------------------------
# LAMB
# --------------------------------------------------------------------------


@pytest.mark.parametrize("trust_clip", [None, 0.5])
def test_lamb_matches_reference_with_changing_lr(trust_clip):
    betas, eps, wd = (0.9, 0.99), 1e-6, 0.01
    model = make_model()
    ref_model = copy.deepcopy(model)
    opt = create_optimizer_lamb(
        model, lr=LRS[0], weight_decay=wd, bn_bias_separately=True, epsilon=eps, betas=betas, trust_clip=trust_clip
    )
    ref_groups = [
        ([p for p in trainable(ref_model) if p.ndim > 1], wd, True),
        ([p for p in trainable(ref_model) if p.ndim <= 1], 0.0, False),
    ]
    ref_state = [[(torch.zeros_like(p), torch.zeros_like(p), 0) for p in ps] for ps, _, _ in ref_groups]
    start = [p.detach().clone() for p in trainable(ref_model)]

    lrs = [lr * 0.01 for lr in LRS]
    for step, lr in enumerate(lrs):
        set_grads(trainable(model), step)
        set_grads(trainable(ref_model), step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        with torch.no_grad():
            for (ps, group_wd, adapt), state in zip(ref_groups, ref_state):
                reference_lamb_step(ps, [p.grad for p in ps], state, lr, betas, eps, group_wd, trust_clip, adapt)

    for p, ref, p0 in zip(trainable(model), trainable(ref_model), start):
        assert (ref - p0).abs().max() > 1e-5
        torch.testing.assert_close(p - p0, ref - p0, rtol=1e-6, atol=1e-10)


def test_lamb_bias_correction_per_parameter():
    # A parameter that gets its first gradient late must see bias correction
    # for t = 1: its first Adam step is then lr * sign(g) (up to eps).
    lr = 0.1
    early = nn.Parameter(torch.ones(3, dtype=torch.float64))
    late = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LAMB([early, late], lr=lr, eps=1e-12, lars_adaptation=False)
    for _ in range(3):
        early.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
    late.grad = torch.full((3,), -0.3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(late.detach(), torch.full((3,), 1.0 + lr, dtype=torch.float64))


def test_lamb_zero_norms_use_unit_trust():
    zero_w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    zero_u = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = LAMB([zero_w, zero_u], lr=0.1)
    zero_w.grad = torch.ones(4, dtype=torch.float64)
    zero_u.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(opt.last_trust_ratios, torch.ones(2, dtype=torch.float64))
    assert not math.isnan(zero_w.sum().item()) and not math.isnan(zero_u.sum().item())


def test_lamb_step_does_not_sync_with_host():
    opt = LAMB(_meta_groups(), lr=0.1, weight_decay=1e-2, trust_clip=10.0)
    opt.step()
    opt.step()
    assert opt.last_trust_ratios.device.type == "meta"
    assert opt.last_trust_ratios.shape == (2,)


def test_create_optimizer_lamb_groups():
    model = make_model()
    opt = create_optimizer_lamb(model, lr=0.01, weight_decay=0.01, bn_bias_separately=True)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(model.conv.weight), id(model.fc.weight)}
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_adaptation"] is False
    assert decay["weight_decay"] == 0.01 and decay["lars_adaptation"] is True


# --------------------------------------------------------------------------
# The two code paths: per-tensor loops (CPU) and foreach kernels (accelerators)
# --------------------------------------------------------------------------


def _lars_no_momentum_factory(model):
    return LARS(trainable(model), lr=0.1, momentum=0.0, weight_decay=1e-3, eta=0.05, trust_clip=0.02)


def _lars_nesterov_factory(model):
    opt = _lars_factory(model)
    for group in opt.param_groups:
        group["nesterov"] = True
    return opt


def _lamb_clipped_factory(model):
    return create_optimizer_lamb(model, lr=0.01, weight_decay=1e-2, bn_bias_separately=True, trust_clip=0.5)


@pytest.mark.parametrize(
    "factory",
    [
        _lars_factory,
        _lars_nesterov_factory,
        _lars_no_momentum_factory,
        _lamb_factory,
        _lamb_clipped_factory,
    ],
    ids=["lars", "lars-nesterov", "lars-no-momentum", "lamb", "lamb-clipped"],
)
def test_per_tensor_path_matches_foreach_path_step_for_step(factory):
    # Both run here on CPU tensors: the foreach path is the one accelerators
    # take, so this keeps it tested on a machine without one. The per-tensor
    # path fuses scalings into fewer kernels, so the two agree up to rounding.
    models = {path: make_model() for path in (False, True)}
    opts = {path: factory(model) for path, model in models.items()}
    for path, opt in opts.items():
        opt._foreach = path
    for step in range(6):
        for path, opt in opts.items():
            set_grads(trainable(models[path]), step)
            for group in opt.param_groups:
                group["lr"] *= 0.7 if step % 2 else 1.3
            opt.step()
        per_tensor, foreach = opts[False], opts[True]
        for p, q in zip(trainable(models[False]), trainable(models[True])):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
            for key, value in per_tensor.state[p].items():
                torch.testing.assert_close(value, foreach.state[q][key], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(per_tensor.last_trust_ratios, foreach.last_trust_ratios, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("optimizer", [LARS, LAMB])
def test_code_path_follows_device(optimizer):
    opt = optimizer([nn.Parameter(torch.ones(2))], lr=0.1)
    assert not opt._uses_foreach([torch.ones(2)])
    assert opt._uses_foreach([torch.ones(2, device="meta")])
    assert opt._uses_foreach([torch.ones(2), torch.ones(2, device="meta")])


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize("optimizer", [LARS, LAMB])
def test_norms_across_shards_decide_the_trust_ratio(optimizer, foreach):
    # The hook is called with the weight norms first, then with the update
    # norms (LARS: the gradient's), and what it returns is what the ratio uses.
    lr, wd, eta, eps = 0.1, 0.01, 0.02, 1e-3
    calls = []

    def hook(params, norms):
        calls.append((list(params), [n.item() for n in norms]))
        return [torch.full_like(n, 3.0 if len(calls) % 2 else 2.0) for n in norms]

    w = nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64))
    g = torch.linspace(0.5, -0.2, 6, dtype=torch.float64)
    w0 = w.detach().clone()
    if optimizer is LARS:
        opt = LARS([w], lr=lr, momentum=0.0, weight_decay=wd, eta=eta, epsilon=eps)
        trust = eta * 3.0 / (2.0 + wd * 3.0 + eps)
        update = g + wd * w0
    else:
        opt = LAMB([w], lr=lr, weight_decay=wd, eps=eps)
        trust = 3.0 / 2.0
        update = g / (g.abs() + eps) + wd * w0  # the first step's m_hat / (sqrt(v_hat) + eps)
    opt._foreach = foreach
    opt.norms_across_shards = hook
    w.grad = g.clone()
    opt.step()

    assert [params for params, _ in calls] == [[w], [w]]
    assert calls[0][1] == pytest.approx([w0.norm().item()])
    torch.testing.assert_close(opt.last_trust_ratios, torch.tensor([trust], dtype=torch.float64))
    torch.testing.assert_close(w.detach(), w0 - lr * trust * update)


# --- copying lars.py and lamb.py ---------------------------------------------------------------------


@pytest.mark.parametrize("module", ["lars", "lamb"])
def test_the_self_check_a_copy_takes_along(module, tmp_path):
    """Copied alone into another directory (lamb.py with lars.py), ``python FILE`` checks itself."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name in {"lars", module}:
        shutil.copy(root / f"{name}.py", tmp_path)
    proc = subprocess.run(
        [sys.executable, f"{module}.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "paths equal" in proc.stdout


def test_the_seed_readmes_usage_runs():
    """The LARS trainer's README, "Usage", its call as written (no epsilon: the defaults fill in)."""
    import torchvision

    from lars import create_optimizer_lars

    model = torchvision.models.resnet18()

    class args:  # noqa: N801 (the README's argparse namespace)
        base_lr, momentum, wd, bn_bias_separately = 5.657, 0.9, 1e-4, True

    optimizer = create_optimizer_lars(
        model=model,
        lr=args.base_lr,
        momentum=args.momentum,
        weight_decay=args.wd,
        bn_bias_separately=args.bn_bias_separately,
    )
    assert [g["lars_adaptation"] for g in optimizer.param_groups] == [True, False]
    assert optimizer.defaults["epsilon"] == 1e-5


def test_lamb_still_imports_from_lars():
    import lamb
    import lars
    from lars import LAMB, create_optimizer_lamb

    assert (LAMB, create_optimizer_lamb) == (lamb.LAMB, lamb.create_optimizer_lamb)
    with pytest.raises(AttributeError):
        lars.no_such_name  # noqa: B018
