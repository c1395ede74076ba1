import math

import pytest
import torch
from torch import nn

from schedulers import CosineWarmup, MultiStepWarmup, PolynomialWarmup

BASES = (0.1, 0.4)  # two param groups with different base learning rates
W, D, END = 5, 25, 0.001


def make_optimizer(bases=BASES):
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in bases]
    return torch.optim.SGD(groups, lr=bases[0])


def lr_sequence(optimizer, scheduler, n):
    """Per-group lrs used by optimizer steps 0 .. n-1 (the training-loop order)."""
    seq = []
    for _ in range(n):
        seq.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seq


# Schedules written straight from the module docstring's formulas.
def warmup(s, base, w):
    return base * (s + 1) / w


def poly(s, base, w=W, d=D, end=END, power=2.0):
    if s < w:
        return warmup(s, base, w)
    return (base - end) * (1 - min(s - w, d - w) / (d - w)) ** power + end


def cosine(s, base, w=W, d=D, end=END):
    if s < w:
        return warmup(s, base, w)
    p = min(s - w, d - w) / (d - w)
    return end + 0.5 * (base - end) * (1 + math.cos(math.pi * p))


def multistep(s, base, milestones, gamma, w=W):
    if s < w:
        return warmup(s, base, w)
    return base * gamma ** sum(m <= s for m in milestones)


def assert_sequence(seq, expected_fn):
    for step, lrs in enumerate(seq):
        for base, lr in zip(BASES, lrs):
            assert lr == pytest.approx(expected_fn(step, base), rel=1e-12, abs=1e-15), step


def test_polynomial_warmup_key_points_default_power_two():
    opt = make_optimizer()
    sched = PolynomialWarmup(opt, decay_steps=D, warmup_steps=W, end_lr=END)
    seq = lr_sequence(opt, sched, D + 6)
    mid = W + (D - W) // 2  # (D - W) is even: exactly half-way through the decay
    for g, base in enumerate(BASES):
        assert seq[0][g] == pytest.approx(base / W)
        assert seq[W - 1][g] == pytest.approx(base)
        assert seq[W][g] == pytest.approx(base)
        # (1 - 1/2) ** 2 == 1/4: checks the default power is 2.
        assert seq[mid][g] == pytest.approx((base - END) / 4 + END)
        assert seq[D][g] == pytest.approx(END)
        assert seq[D + 5][g] == pytest.approx(END)
    assert_sequence(seq, poly)
    # get_last_lr reports the rate the next optimizer step will use.
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_polynomial_power_and_no_warmup():
    opt = make_optimizer()
    sched = PolynomialWarmup(opt, decay_steps=D, warmup_steps=0, end_lr=0.0, power=1.0)
    seq = lr_sequence(opt, sched, D + 2)
    assert seq[0] == list(BASES)  # no warmup: step 0 at the base rate
    assert_sequence(seq, lambda s, b: poly(s, b, w=0, end=0.0, power=1.0))
    assert seq[D // 2][1] == pytest.approx(BASES[1] * (1 - (D // 2) / D))


def test_cosine_warmup_values():
    opt = make_optimizer()
    sched = CosineWarmup(opt, decay_steps=D, warmup_steps=W, end_lr=END)
    seq = lr_sequence(opt, sched, D + 4)
    mid = W + (D - W) // 2
    for g, base in enumerate(BASES):
        assert seq[0][g] == pytest.approx(base / W)
        assert seq[W - 1][g] == pytest.approx(base)
        assert seq[W][g] == pytest.approx(base)
        assert seq[mid][g] == pytest.approx((base + END) / 2)
        assert seq[D][g] == pytest.approx(END)
        assert seq[D + 3][g] == pytest.approx(END)
    assert_sequence(seq, cosine)


def test_multistep_warmup_values():
    milestones, gamma = [12, 8], 0.1  # unsorted on purpose
    opt = make_optimizer()
    sched = MultiStepWarmup(opt, milestones=milestones, gamma=gamma, warmup_steps=W)
    seq = lr_sequence(opt, sched, 20)
    for g, base in enumerate(BASES):
        assert seq[0][g] == pytest.approx(base / W)
        assert seq[W - 1][g] == pytest.approx(base)
        assert seq[7][g] == pytest.approx(base)
        assert seq[8][g] == pytest.approx(base * gamma)
        assert seq[11][g] == pytest.approx(base * gamma)
        assert seq[12][g] == pytest.approx(base * gamma**2)
        assert seq[19][g] == pytest.approx(base * gamma**2)
    assert_sequence(seq, lambda s, b: multistep(s, b, milestones, gamma))


SCHEDULES = {
    "poly": lambda opt: PolynomialWarmup(opt, decay_steps=D, warmup_steps=W, end_lr=END, power=3.0),
    "cosine": lambda opt: CosineWarmup(opt, decay_steps=D, warmup_steps=W, end_lr=END),
    "multistep": lambda opt: MultiStepWarmup(opt, milestones=[8, 15], gamma=0.5, warmup_steps=W),
}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("resume_at", [3, W, 12])
def test_resume_from_state_dict_gives_same_sequence(name, resume_at):
    make_sched = SCHEDULES[name]
    total = D + 3

    opt = make_optimizer()
    uninterrupted = lr_sequence(opt, make_sched(opt), total)

    opt = make_optimizer()
    sched = make_sched(opt)
    lr_sequence(opt, sched, resume_at)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    # A fresh process: different initial lrs, which the checkpoint must override.
    opt = make_optimizer(bases=(7.0, 9.0))
    sched = make_sched(opt)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    resumed = lr_sequence(opt, sched, total - resume_at)

    # Closed-form rates: resuming must reproduce them exactly, not approximately.
    assert resumed == uninterrupted[resume_at:]


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: PolynomialWarmup(opt, decay_steps=10, warmup_steps=10),
        lambda opt: PolynomialWarmup(opt, decay_steps=5, warmup_steps=10),
        lambda opt: PolynomialWarmup(opt, decay_steps=10, warmup_steps=-1),
        lambda opt: PolynomialWarmup(opt, decay_steps=10, warmup_steps=2.5),
        lambda opt: PolynomialWarmup(opt, decay_steps=10, power=0.0),
        lambda opt: PolynomialWarmup(opt, decay_steps=10, power=-1.0),
        lambda opt: PolynomialWarmup(opt, decay_steps=10, end_lr=-0.1),
        lambda opt: CosineWarmup(opt, decay_steps=0),
        lambda opt: CosineWarmup(opt, decay_steps=4, warmup_steps=4),
        lambda opt: MultiStepWarmup(opt, milestones=[5, -1]),
        lambda opt: MultiStepWarmup(opt, milestones=[5], gamma=0.0),
        lambda opt: MultiStepWarmup(opt, milestones=[5], warmup_steps=-2),
    ],
)
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make(make_optimizer())


def test_integral_float_steps_accepted():
    opt = make_optimizer()
    sched = PolynomialWarmup(opt, decay_steps=20.0, warmup_steps=4.0)
    assert sched.warmup_steps == 4 and sched.decay_steps == 20
    assert opt.param_groups[0]["lr"] == pytest.approx(BASES[0] / 4)
