"""The large-batch techniques of issue 19, each against a direct computation: zero-initialised
residuals, ghost batch norm, PreciseBN, Nesterov momentum, and their flags."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from largebatch import batchnorm
from largebatch.config import UsageError, parse_config
from largebatch.job import build_optimizer
from largebatch.model import build_model
from largebatch.precision import Precision
from lars import LARS

# --- zero-initialised residuals ----------------------------------------------------------------------


@pytest.mark.parametrize("name, last", [("resnet18", "bn2"), ("resnet50", "bn3"), ("cifar_resnet8", "bn2")])
def test_zero_init_touches_exactly_the_last_batch_norm_of_each_block(name, last):
    fresh = build_model(name, 10)
    torch.manual_seed(0)
    model = build_model(name, 10, zero_init_residual=True)
    zeroed = {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 1 and not p.any()}
    blocks = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck))
    ]
    assert blocks and zeroed == {f"{b}.{last}.weight" for b in blocks}
    for n, p in fresh.named_parameters():  # everything else as a fresh model has it (BN weights of 1)
        if n not in zeroed and p.ndim == 1 and n.endswith(".weight") and "bn" in n:
            assert bool((dict(model.named_parameters())[n] == 1).all()), n


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "vgg11"])
def test_zero_init_refuses_a_model_without_residual_blocks(name):
    with pytest.raises(UsageError, match=f"--zero-init-residual: {name} has no residual blocks"):
        build_model(name, 10, zero_init_residual=True)


def test_zero_init_with_lars_needs_the_normalisation_weights_kept_apart():
    """A zero gamma in a LARS-adapted group would get a trust ratio of 1, a raw step at LARS's
    base rate; with --bn-bias-separately it steps as every other normalisation weight."""
    base = ["--synthetic", "--model", "resnet18", "--zero-init-residual"]
    with pytest.raises(UsageError, match="--zero-init-residual with --base-op lars needs --bn-bias-separately"):
        parse_config([*base, "--base-op", "lars"])
    assert parse_config([*base, "--base-op", "lars", "--bn-bias-separately"]).norm.zero_init_residual
    assert parse_config([*base, "--base-op", "sgd"]).norm.zero_init_residual
    with pytest.raises(UsageError, match="--zero-init-residual starts from fresh weights"):
        parse_config([*base, "--pretrained"])


# --- ghost batch norm ------------------------------------------------------------------------------------


def test_ghost_batch_norm_equals_batch_norm_chunk_by_chunk():
    torch.manual_seed(0)
    ghost, plain = batchnorm.GhostBatchNorm(3, ghost_size=4), nn.BatchNorm2d(3)
    with torch.no_grad():
        for bn in (ghost, plain):
            bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(10, 3, 5, 5)
    out = ghost(x)
    expected = torch.cat([plain(chunk) for chunk in x.tensor_split(math.ceil(10 / 4))])  # 4 + 3 + 3
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ghost, name), getattr(plain, name)), name
    ghost.eval(), plain.eval()
    assert torch.equal(ghost(x), plain(x))  # evaluation: batch norm


def test_a_ghost_batch_norm_model_saves_a_plain_models_checkpoint():
    model = batchnorm.convert_ghost_batchnorm(build_model("resnet18", 10), 8)
    assert sum(isinstance(m, batchnorm.GhostBatchNorm) for m in model.modules()) == 20
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(model.state_dict())  # strict: the same names and shapes


# --- PreciseBN ------------------------------------------------------------------------------------------------


class _State:
    """What batchnorm.recompute reads of a TrainState."""

    def __init__(self, model):
        self.model, self.precision = model, Precision(torch.device("cpu"))


def test_precise_bn_equals_a_direct_two_pass_average():
    """The running statistics after recompute are, for each layer, the mean over batches of
    that batch's mean and unbiased variance of the layer's input under the current weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    batches = [(torch.randn(n, 3, 8, 8), torch.zeros(n, dtype=torch.long)) for n in (6, 4, 5)]
    layers = [model[1], model[4]]
    inputs: list[list[torch.Tensor]] = [[], []]
    hooks = [
        bn.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach())) for i, bn in enumerate(layers)
    ]
    model.train()
    with torch.no_grad():
        for images, _ in batches:
            model(images)
    for h in hooks:
        h.remove()
    expected = [
        (
            torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0),
            torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0),
        )
        for xs in inputs
    ]
    for bn in layers:  # statistics a long run would have: anything but these
        bn.running_mean.fill_(7.0), bn.running_var.fill_(9.0)
    momenta = [bn.momentum for bn in layers]

    used = batchnorm.recompute(_State(model), iter(batches), num_batches=3)
    assert used == 15
    for bn, (mean, var) in zip(layers, expected):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert [bn.momentum for bn in layers] == momenta


def test_precise_bn_counts_batches_the_same_on_every_rank():
    """An empty batch (every image unreadable) is still a forward pass, as on every other rank,
    and adds nothing to the averages."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    full = (torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))
    empty = (torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))
    used = batchnorm.recompute(_State(model), iter([full, empty, full, full]), num_batches=3)
    assert used == 12  # three batches read, the third not: it is past num_batches


# --- Nesterov -----------------------------------------------------------------------------------------------


def _steps(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_nesterov_sgd_is_torchs():
    cfg = parse_config(["--synthetic", "--base-op", "sgd", "--nesterov", "--wd", "0"])
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(cfg, model, 0.1)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]


def test_nesterov_lars_without_adaptation_is_torchs_nesterov_sgd():
    """With the trust ratio off and a constant rate, LARS's buffer (which holds the rate) and
    torch's (which does not) give the same Nesterov steps."""
    torch.manual_seed(0)
    start = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    a = [nn.Parameter(p.clone()) for p in start]
    b = [nn.Parameter(p.clone()) for p in start]
    lars = LARS(a, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, lars_adaptation=False)
    sgd = torch.optim.SGD(b, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for x, y in zip(_steps(lars, a, grads), _steps(sgd, b, grads)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_nesterov_flags():
    assert parse_config(["--synthetic", "--base-op", "lars", "--nesterov"]).optim.nesterov
    with pytest.raises(UsageError, match="--nesterov: LAMB has no momentum buffer"):
        parse_config(["--synthetic", "--base-op", "lamb", "--nesterov"])
    with pytest.raises(UsageError, match="--nesterov needs a --momentum above 0"):
        parse_config(["--synthetic", "--nesterov", "--momentum", "0"])


# --- evaluation cadence and target -------------------------------------------------------------------------


def test_evaluation_cadence_and_target_flags():
    cfg = parse_config(["--synthetic", "--eval-every", "4", "--target-top1", "75.9"])
    assert (cfg.validation.eval_every, cfg.validation.target_top1) == (4, 75.9)
    with pytest.raises(UsageError, match="--target-top1"):
        parse_config(["--synthetic", "--target-top1", "101"])
    with pytest.raises(UsageError, match="--ghost-bn 16 is not below --batch-size 16"):
        parse_config(["--synthetic", "--batch-size", "16", "--ghost-bn", "16"])
    with pytest.raises(UsageError, match="--ghost-bn and --sync-bn"):
        parse_config(["--synthetic", "--batch-size", "32", "--ghost-bn", "16", "--sync-bn"])


# --- the weights' moving average --------------------------------------------------------------------------


def test_the_averages_horizon_in_images_does_not_change_with_the_global_batch():
    from largebatch.ema import decay_per_update

    assert decay_per_update(0.999, 256, 1) == pytest.approx(0.999)
    assert decay_per_update(0.999, 512, 1) == pytest.approx(0.999**2)
    assert decay_per_update(0.999, 64, 2) == pytest.approx(0.999**0.5)
    # after 102,400 images, whatever the batch: the same weight left on the start
    for batch, every in ((32, 1), (256, 1), (1024, 4)):
        updates = 102_400 // (batch * every)
        assert decay_per_update(0.999, batch, every) ** updates == pytest.approx(0.999**400)


def test_the_average_moves_every_k_steps_by_its_decay():
    from largebatch.ema import ModelEma

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ema = ModelEma(model, decay=0.9, every=2, precision=Precision(torch.device("cpu")))
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=1)  # not a multiple of 2: unchanged
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), start))
    ema.update(model, step=2)
    for a, s, w in zip(ema.module.parameters(), start, model.parameters()):
        torch.testing.assert_close(a, 0.9 * s + 0.1 * w.detach(), rtol=0, atol=1e-15)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_flags():
    with pytest.raises(UsageError, match="--model-ema 1 must be below 1"):
        parse_config(["--synthetic", "--model-ema", "1"])
    with pytest.raises(UsageError, match="--evaluate-ema goes with --evaluate"):
        parse_config(["--synthetic", "--evaluate-ema"])
