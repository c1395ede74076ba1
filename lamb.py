"""LAMB for large-batch training: You et al., "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes", arXiv:1904.00962. It shares lars.py's trust-ratio machinery
and update paths (see there, also for what copying these files takes): copy both.
``python lamb.py`` checks a copy: the accelerator's path against the CPU's against the
formula below, on a small model.
"""

from collections.abc import Iterable

import torch
from torch.optim.optimizer import required

from lars import _LayerwiseOptimizer, _norms, _scales, _trust_ratios, param_groups

__all__ = ["LAMB", "create_optimizer_lamb"]


class LAMB(_LayerwiseOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training (LAMB).

    For every parameter tensor :math:`w` with gradient :math:`g` at its
    :math:`t`-th update (:math:`t = 1, 2, \dots`), learning rate
    :math:`\eta_{lr}`, betas :math:`(\beta_1, \beta_2)` and weight decay
    :math:`\lambda`:

    .. math::

        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat m &= m / (1 - \beta_1^t), \qquad
        \hat v = v / (1 - \beta_2^t) \\
        u &= \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda w \\
        \tau &= \lVert w \rVert / \lVert u \rVert
                \qquad (\tau = 1 \text{ if } \lVert w \rVert = 0
                        \text{ or } \lVert u \rVert = 0) \\
        \tau &\leftarrow \min(\tau, \text{trust\_clip})
                \qquad \text{(only if trust\_clip is given)} \\
        w &\leftarrow w - \eta_{lr} \, \tau \, u

    In param groups with ``lars_adaptation=False``, :math:`\tau = 1`, i.e.
    the group is trained with AdamW-style decoupled weight decay (plain Adam
    when its weight decay is 0).

    The step count :math:`t` is a Python int kept per parameter in
    ``state[p]['step']``: a per-parameter count keeps the bias correction
    right for parameters that receive their first gradient late, and being a
    Python number it is never read back from the device.

    On the CPU, :math:`u` is computed into a buffer per parameter that is kept
    from step to step (outside ``state``, so not in checkpoints): every
    :math:`u` of a group has to exist at once, because the trust ratios need
    the norms of all of them first (``norms_across_shards`` combines them
    across processes), and allocating that much afresh every step costs more
    than the whole update (see the module docstring). Compared with the
    foreach path, which allocates :math:`u` and the denominators anew every
    step, that holds one copy of the parameters more between steps and one
    less at the peak.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate (see :class:`LARS` for why it has a sentinel
            default).
        betas: coefficients of the running averages of the gradient and its
            square.
        eps: added to :math:`\sqrt{\hat v}` for numerical stability.
        weight_decay: decoupled weight decay :math:`\lambda`, part of the
            update whose norm defines the trust ratio.
        trust_clip: optional upper bound on the trust ratio.
        lars_adaptation: apply the trust ratio (same switch name as
            :class:`LARS` so that the same grouping code serves both).

    Attributes:
        last_trust_ratios: as for :class:`LARS`.
        norms_across_shards: as for :class:`LARS`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = required,  # type: ignore[assignment]  # torch's sentinel for a required rate
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_clip: float | None = None,
        lars_adaptation: bool = True,
    ):
        if lr is not required and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if trust_clip is not None and trust_clip <= 0.0:
            raise ValueError(f"Invalid trust_clip value: {trust_clip}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            trust_clip=trust_clip,
            lars_adaptation=lars_adaptation,
        )
        super().__init__(params, defaults)
        self._update_buffers: dict[torch.Tensor, torch.Tensor] = {}

    def _update_group(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]):
        """Update one group's params in place; returns its trust ratios (None if not adapted)."""
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

        # Bias corrections are Python floats (from Python int steps), so
        # they enter the kernels as scalars, not device reads.
        bias_correction1 = [1 - beta1**t for t in steps]
        bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
        foreach = self._uses_foreach(params)
        compute_updates = self._updates_foreach if foreach else self._updates_per_tensor
        updates = compute_updates(group, params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2_sqrt)

        lr = group["lr"]
        trust = None
        if group["lars_adaptation"]:
            trust = _trust_ratios(
                _norms(self, params, params),
                _norms(self, params, updates),
                numerator_scale=1.0,
                d_w_scale=0.0,
                epsilon=0.0,
                trust_clip=group["trust_clip"],
            )
        if foreach:
            if trust is not None:
                torch._foreach_mul_(updates, list((lr * trust).unbind(0)))
            else:
                torch._foreach_mul_(updates, lr)
            torch._foreach_sub_(params, updates)
        else:
            for p, u, scale in zip(params, updates, _scales(lr, trust, len(params))):
                p.sub_(u, alpha=scale)
        return trust

    @staticmethod
    def _updates_foreach(group, params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2_sqrt):
        """Moments and :math:`u` with foreach kernels; :math:`u` in new tensors."""
        beta1, beta2 = group["betas"]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(updates, bias_correction1)
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        return updates

    def _updates_per_tensor(self, group, params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2_sqrt):
        r"""Moments and :math:`u`, one tensor at a time, into the kept update buffers.

        :math:`\hat m / (\sqrt{\hat v} + \epsilon)` is computed as
        :math:`m / (c_1 \sqrt{v} / c_2 + c_1 \epsilon)` with the bias
        corrections :math:`c_1 = 1 - \beta_1^t` and :math:`c_2 = \sqrt{1 - \beta_2^t}`
        folded into the denominator, which saves a pass over :math:`u`.
        """
        beta1, beta2 = group["betas"]
        eps, weight_decay = group["eps"], group["weight_decay"]
        updates = []
        for p, g, m, v, c1, c2 in zip(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2_sqrt):
            u = self._update_buffers.get(p)
            if u is None:
                u = torch.empty_like(p, memory_format=torch.preserve_format)
                self._update_buffers[p] = u
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            torch.sqrt(v, out=u).mul_(c1 / c2).add_(c1 * eps)
            torch.div(m, u, out=u)
            if weight_decay != 0:
                u.add_(p, alpha=weight_decay)
            updates.append(u)
        return updates


def create_optimizer_lamb(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    bn_bias_separately: bool,
    epsilon: float = 1e-6,
    betas: tuple[float, float] = (0.9, 0.999),
    trust_clip: float | None = None,
) -> LAMB:
    """Build :class:`LAMB` for ``model``'s trainable parameters.

    Grouping as in :func:`create_optimizer_lars`.
    """
    groups = param_groups(model, weight_decay, bn_bias_separately)
    return LAMB(
        groups,
        lr=lr,
        betas=betas,
        eps=epsilon,
        weight_decay=weight_decay,
        trust_clip=trust_clip,
    )


# --- `python lamb.py`: the self-check a copy takes along ----------------------------------------


def _reference_step(params, grads, state, t, lr, betas, eps, weight_decay):
    """One LAMB step as the class docstring writes it, tensor by tensor."""
    beta1, beta2 = betas
    for w, g, (m, v) in zip(params, grads, state):
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps) + weight_decay * w
        trust = w.norm() / u.norm() if w.norm() > 0 and u.norm() > 0 else 1.0
        w.sub_(lr * trust * u)


def self_check(steps: int = 5) -> float:
    """The foreach path, the per-tensor path and :func:`_reference_step` from the same start,
    ``steps`` steps in float64; returns the largest difference (AssertionError above 1e-10)."""
    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (5, 288), (5,)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    settings: dict = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    reference = [p.clone() for p in start]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in start]
    optimizers = []
    for foreach in (True, False):
        opt = LAMB([torch.nn.Parameter(p.clone()) for p in start], **settings)
        opt._foreach = foreach
        optimizers.append(opt)
    worst = 0.0
    for t in range(1, steps + 1):
        grads = [torch.randn_like(p) for p in start]
        for opt in optimizers:
            for p, g in zip(opt.param_groups[0]["params"], grads):
                p.grad = g.clone()
            opt.step()
        _reference_step(reference, grads, moments, t, **settings)
        for opt in optimizers:
            for p, q in zip(opt.param_groups[0]["params"], reference):
                worst = max(worst, (p.detach() - q).abs().max().item())
                assert torch.allclose(p.detach(), q, rtol=0, atol=1e-10), "LAMB differs from its formula"
    return worst


if __name__ == "__main__":
    print(f"lamb.py: the foreach and per-tensor paths equal the formula (largest difference {self_check():.1e})")
