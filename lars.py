"""LARS for large-batch training: You, Gitman & Ginsburg, "Large Batch Training of
Convolutional Networks", arXiv:1708.03888 (Algorithm 1), in the form used by the MLPerf /
TensorFlow TPU ResNet-50 reference. LAMB, which shares its trust-ratio machinery, is in
lamb.py beside it (``from lars import LAMB, create_optimizer_lamb`` still works).

Copying this file. It depends only on PyTorch and the standard library: copy it alone into
another code base (and lamb.py with it for LAMB). ``python lars.py`` checks a copy: the
accelerator's update path against the CPU's against a plain transcription of Algorithm 1,
on a small model. Three things in it serve largebatch only and can be ignored (or deleted):
``last_trust_ratios`` (the latest ratios, for logging), ``norms_across_shards`` (a hook for
layers split across processes), and ``_foreach`` (a switch the tests use to force a path).

The per-tensor trust ratios are computed on the device with ``torch._foreach_*`` kernels
and ``torch.where``. On an accelerator the elementwise updates are ``torch._foreach_*``
kernels too and nothing in ``step()`` reads a tensor value back to the host, so a step never
stalls the CUDA stream. The ratios of the latest step stay on the device in
``last_trust_ratios`` (reading them *is* a sync, so do it only when logging).

On the CPU the same arithmetic runs as a loop over tensors instead (see
:meth:`_LayerwiseOptimizer._uses_foreach`). A host read costs nothing there, and the
``_foreach`` path is slow: it materialises a temporary for every tensor of a group at once,
as much memory as the parameters, which glibc tends to hand back to the OS when it is freed,
so that every step faults it back in page by page -- that costs more than the arithmetic.
The loop updates in place and touches each tensor while it is still in cache.

:func:`create_optimizer_lars` builds the optimizer with the usual large-batch convention of
exempting normalisation and bias parameters from weight decay and from the trust ratio.
"""

from collections.abc import Callable, Iterable

import torch
from torch.optim.optimizer import required

# LAMB and create_optimizer_lamb come from lamb.py through __getattr__ below.
__all__ = ["LARS", "LAMB", "create_optimizer_lars", "create_optimizer_lamb", "param_groups"]  # noqa: F822
_IN_LAMB = ("LAMB", "create_optimizer_lamb")


def _trust_ratios(
    w_norms: list[torch.Tensor],
    d_norms: list[torch.Tensor],
    numerator_scale: float,
    d_w_scale: float,
    epsilon: float,
    trust_clip: float | None,
) -> torch.Tensor:
    """Per-tensor ``s * ||w|| / (||d|| + c * ||w|| + eps)`` as one 1-D tensor.

    Tensors whose weight or update norm is zero get a ratio of 1: a zero
    weight (e.g. a freshly zero-initialised layer) would otherwise never move,
    and a zero update would produce 0/0.
    """
    w_norm = torch.stack(w_norms)
    d_norm = torch.stack(d_norms)
    denom = d_norm + d_w_scale * w_norm + epsilon
    ratio = numerator_scale * w_norm / denom
    # torch.where instead of a Python branch keeps the decision on the device.
    ratio = torch.where((w_norm > 0) & (d_norm > 0), ratio, 1.0)
    if trust_clip is not None:
        ratio = ratio.clamp(max=trust_clip)
    return ratio


def _norms(optimizer, params: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms of ``tensors`` (the parameters or their updates), through the
    optimizer's ``norms_across_shards`` hook when one is set."""
    norms = list(torch._foreach_norm(tensors))
    if optimizer.norms_across_shards is not None:
        norms = optimizer.norms_across_shards(params, norms)
    return norms


def _concat_or_none(ratios: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(ratios) if ratios else None


def _scales(lr: float, trust: torch.Tensor | None, count: int) -> list[float]:
    """``lr * trust`` per tensor as Python floats, for the per-tensor (CPU) loops.

    Reading the ratios back is free on the CPU, and a Python scalar can ride
    along in an in-place kernel's ``alpha`` instead of costing a pass over the
    tensor of its own.
    """
    if trust is None:
        return [lr] * count
    return (lr * trust).tolist()


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """What LARS and LAMB share: the step over param groups, and the last trust ratios
    kept on the device for logging. Subclasses implement ``_update_group``."""

    # Which implementation of the elementwise updates step() runs: None picks
    # by device (see _uses_foreach); True or False forces the foreach or the
    # per-tensor one, which lets the tests run the accelerator's code path on
    # CPU tensors and compare the two.
    _foreach: bool | None = None

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self.last_trust_ratios: torch.Tensor | None = None
        self.norms_across_shards: Callable | None = None

    def _uses_foreach(self, params: list[torch.Tensor]) -> bool:
        """Whether to update ``params`` with ``torch._foreach_*`` kernels (on an
        accelerator, no host sync) rather than a per-tensor loop (on the CPU).

        On a GPU the foreach kernels launch a handful of kernels for all tensors
        together and keep every scalar on the device; a per-tensor loop there
        would launch several kernels per tensor and read each trust ratio back,
        stalling the stream. On the CPU neither cost exists, and the loop avoids
        the foreach path's temporaries (see the module docstring).
        """
        if self._foreach is not None:
            return self._foreach
        return not all(p.device.type == "cpu" for p in params)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure: optional callable that re-evaluates the model and
                returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adapted_ratios = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            trust = self._update_group(group, params, grads)
            if trust is not None:
                adapted_ratios.append(trust)
        self.last_trust_ratios = _concat_or_none(adapted_ratios)
        return loss

    def _update_group(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]):
        raise NotImplementedError


class LARS(_LayerwiseOptimizer):
    r"""Layer-wise Adaptive Rate Scaling (LARS) with momentum.

    For every parameter tensor :math:`w` with gradient :math:`g`, learning
    rate :math:`\eta_{lr}`, momentum :math:`\mu`, weight decay :math:`\beta`
    and LARS coefficient :math:`\eta`:

    .. math::

        \tau &= \frac{\eta \, \lVert w \rVert}
                     {\lVert g \rVert + \beta \lVert w \rVert + \epsilon}
                \qquad (\tau = 1 \text{ if } \lVert w \rVert = 0
                        \text{ or } \lVert g \rVert = 0) \\
        \tau &\leftarrow \min(\tau, \text{trust\_clip})
                \qquad \text{(only if trust\_clip is given)} \\
        v &\leftarrow \mu v + \eta_{lr} \, \tau \, (g + \beta w) \\
        w &\leftarrow w - v

    With ``nesterov=True`` the last line becomes
    :math:`w \leftarrow w - (\eta_{lr} \tau (g + \beta w) + \mu v)`, which is
    what TensorFlow's ``ApplyMomentum(use_nesterov=True)`` computes with a
    learning rate of 1. In param groups with ``lars_adaptation=False``,
    :math:`\tau = 1` and the update is plain momentum SGD (with the same
    buffer convention).

    **Why the learning rate sits inside the momentum buffer.** PyTorch's
    :class:`~torch.optim.SGD` accumulates raw gradients and multiplies the
    whole buffer by the *current* learning rate, so a learning-rate change
    immediately rescales the velocity built up under earlier rates. The
    TensorFlow LARS reference (which the published large-batch ImageNet
    hyper-parameters were tuned with) instead feeds the already scaled update
    :math:`\eta_{lr}\tau(g + \beta w)` to a momentum optimizer with learning
    rate 1. Each contribution therefore keeps the learning rate and the trust
    ratio of the step that produced it, and schedule changes (the end of a
    steep warmup in particular) only affect new contributions. The trust ratio
    changes every step, so it has to be applied per contribution anyway;
    keeping the learning rate next to it reproduces the reference exactly.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate. It has a "required" sentinel default only so that
            wrappers that re-construct the optimizer from its param groups
            (``horovod.torch.DistributedOptimizer``) keep working; pass it.
        momentum: momentum factor :math:`\mu`.
        weight_decay: L2 penalty :math:`\beta`, added to the gradient before
            the momentum update and included in the trust-ratio denominator.
        eta: LARS coefficient (trust coefficient) :math:`\eta`.
        epsilon: added to the trust-ratio denominator.
        trust_clip: optional upper bound on the trust ratio (it then bounds
            every ratio, including the zero-norm fallback of 1).
        lars_adaptation: apply the trust ratio; set to ``False`` in a param
            group to train it with plain momentum SGD.
        nesterov: use Nesterov momentum.

    Attributes:
        last_trust_ratios: ``None`` before the first step; afterwards a 1-D
            tensor on the parameters' device with the trust ratio of every
            adapted tensor that had a gradient in the latest step, in param
            group order (``None`` if no tensor was adapted). Reading its
            values synchronises with the device.
        norms_across_shards: ``None``, or a callable ``(params, norms) -> norms``
            for parameters that are slices of a larger tensor split across
            processes (a model-parallel layer): given the per-tensor norms
            computed locally, it returns the norms of the whole tensors, so
            the trust ratio is the one of the unsplit layer. It may
            communicate; every process must then step the same groups.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = required,  # type: ignore[assignment]  # torch's sentinel for a required rate
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        epsilon: float = 0.0,
        trust_clip: float | None = None,
        lars_adaptation: bool = True,
        nesterov: bool = False,
    ):
        if lr is not required and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if eta < 0.0:
            raise ValueError(f"Invalid eta value: {eta}")
        if epsilon < 0.0:
            raise ValueError(f"Invalid epsilon value: {epsilon}")
        if trust_clip is not None and trust_clip <= 0.0:
            raise ValueError(f"Invalid trust_clip value: {trust_clip}")
        if nesterov and momentum <= 0.0:
            raise ValueError("Nesterov momentum requires a positive momentum")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            epsilon=epsilon,
            trust_clip=trust_clip,
            lars_adaptation=lars_adaptation,
            nesterov=nesterov,
        )
        super().__init__(params, defaults)

    def _update_group(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]):
        """Update one group's params in place; returns its trust ratios (None if not adapted)."""
        trust = None
        if group["lars_adaptation"]:
            trust = _trust_ratios(
                _norms(self, params, params),
                _norms(self, params, grads),
                numerator_scale=group["eta"],
                d_w_scale=group["weight_decay"],
                epsilon=group["epsilon"],
                trust_clip=group["trust_clip"],
            )
        bufs = self._momentum_buffers(params) if group["momentum"] != 0 else None
        if self._uses_foreach(params):
            self._apply_foreach(group, params, grads, bufs, trust)
        else:
            scales = _scales(group["lr"], trust, len(params))
            self._apply_per_tensor(group, params, grads, bufs, scales)
        return trust

    def _momentum_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                # The TF reference starts its accumulator at zero.
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return bufs

    @staticmethod
    def _apply_foreach(group, params, grads, bufs, trust):
        """The update with foreach kernels and the trust ratios as device tensors."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        # New tensors rather than in-place on p.grad: callers (gradient
        # clipping, logging, Horovod's allreduce buffers) may still use it.
        if weight_decay != 0:
            updates = torch._foreach_add(grads, params, alpha=weight_decay)
        else:
            updates = [g.clone() for g in grads]
        if trust is not None:
            torch._foreach_mul_(updates, list((lr * trust).unbind(0)))
        else:
            torch._foreach_mul_(updates, lr)

        if bufs is not None:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, updates)
            if group["nesterov"]:
                torch._foreach_add_(updates, bufs, alpha=momentum)
            else:
                updates = bufs
        torch._foreach_sub_(params, updates)

    @staticmethod
    def _apply_per_tensor(group, params, grads, bufs, scales):
        r"""The same update, one tensor at a time, with ``scales[i] = lr * trust_i``
        as Python floats.

        The scaled update :math:`s (g + \beta w)` is never materialised: each
        of its two terms goes into the buffer (or the weights) through
        ``alpha``, so a step allocates nothing and leaves p.grad untouched.
        """
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        nesterov = group["nesterov"]
        for p, g, buf, scale in zip(params, grads, bufs or [None] * len(params), scales):
            if buf is not None:
                buf.mul_(momentum).add_(g, alpha=scale)
                if weight_decay != 0:
                    buf.add_(p, alpha=scale * weight_decay)
            if buf is not None and not nesterov:
                p.sub_(buf)
            else:
                # w - s (g + beta w) = (1 - s beta) w - s g; Nesterov also subtracts mu v.
                if weight_decay != 0:
                    p.mul_(1 - scale * weight_decay)
                p.add_(g, alpha=-scale)
                if buf is not None:
                    p.sub_(buf, alpha=momentum)


def param_groups(model: torch.nn.Module, weight_decay: float, bn_bias_separately: bool) -> list[dict]:
    """Param groups with normalisation weights and biases optionally split off.

    Tensors with at most one dimension (BatchNorm/LayerNorm scales and shifts,
    every bias) get neither weight decay nor a trust ratio: decaying them only
    hurts accuracy, and their norms are not comparable to their gradients'
    the way a layer's weight matrix is, so layer-wise scaling makes them
    either freeze or blow up. This is the grouping of the LARS/MLPerf
    reference ("skip batch norm and bias").
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not bn_bias_separately:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_adaptation": False})
    return groups


def create_optimizer_lars(
    model: torch.nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-5,
    bn_bias_separately: bool = False,
    epsilon: float = 1e-5,
    eta: float = 0.001,
    trust_clip: float | None = None,
    nesterov: bool = False,
) -> LARS:
    """Build :class:`LARS` for ``model``'s trainable parameters. The defaults are the
    original Horovod + LARS trainer's (its --momentum, --wd, --epsilon), so its README's
    ``create_optimizer_lars(model=..., lr=..., momentum=..., weight_decay=...,
    bn_bias_separately=...)`` means what it meant there.

    With ``bn_bias_separately`` (recommended), parameters with ``ndim <= 1`` form a second
    param group (after the weights) with ``weight_decay=0`` and ``lars_adaptation=False``;
    empty groups are left out.
    """
    groups = param_groups(model, weight_decay, bn_bias_separately)
    return LARS(
        groups,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        eta=eta,
        epsilon=epsilon,
        trust_clip=trust_clip,
        nesterov=nesterov,
    )


def __getattr__(name: str):
    # LAMB moved to lamb.py; importing it from here keeps working, and costs nothing until asked.
    if name in _IN_LAMB:
        import lamb

        return getattr(lamb, name)
    raise AttributeError(f"module 'lars' has no attribute {name!r}")


# --- `python lars.py`: the self-check a copy takes along ----------------------------------------


def _algorithm_1(params, grads, bufs, lr, momentum, weight_decay, eta, epsilon):
    """One LARS step as the paper and the TF reference write it, tensor by tensor."""
    for w, g, v in zip(params, grads, bufs):
        w_norm, g_norm = w.norm(), g.norm()
        trust = eta * w_norm / (g_norm + weight_decay * w_norm + epsilon) if w_norm > 0 and g_norm > 0 else 1.0
        v.mul_(momentum).add_(lr * trust * (g + weight_decay * w))
        w.sub_(v)


def self_check(steps: int = 5) -> float:
    """The foreach path, the per-tensor path and :func:`_algorithm_1` from the same start,
    ``steps`` steps on a small model in float64; returns the largest difference (raises
    AssertionError if any exceeds 1e-12)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).double()
    x, y = torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    settings: dict = dict(lr=0.5, momentum=0.9, weight_decay=1e-4, eta=0.001, epsilon=1e-5)
    copies = [[p.detach().clone() for p in model.parameters()] for _ in range(3)]
    bufs = [torch.zeros_like(p) for p in copies[2]]
    optimizers = []
    for params, foreach in zip(copies[:2], (True, False)):
        opt = LARS([torch.nn.Parameter(p) for p in params], **settings)
        opt._foreach = foreach
        optimizers.append(opt)
    worst = 0.0
    for _ in range(steps):
        reference = [torch.nn.Parameter(p.clone()) for p in copies[2]]
        weights: dict[str, torch.Tensor] = dict(zip(dict(model.named_parameters()), reference))
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)
        grads = torch.autograd.grad(loss, reference)
        for opt in optimizers:
            for p, g in zip(opt.param_groups[0]["params"], grads):
                p.grad = g.clone()
            opt.step()
        _algorithm_1(copies[2], list(grads), bufs, **settings)
        for opt in optimizers:
            for p, q in zip(opt.param_groups[0]["params"], copies[2]):
                worst = max(worst, (p.detach() - q).abs().max().item())
                assert torch.allclose(p.detach(), q, rtol=0, atol=1e-12), "LARS differs from Algorithm 1"
            # Every path continues from the reference's weights, so the gradients stay shared.
            for p, q in zip(opt.param_groups[0]["params"], copies[2]):
                p.data.copy_(q)
    return worst


if __name__ == "__main__":
    print(f"lars.py: the foreach and per-tensor paths equal Algorithm 1 (largest difference {self_check():.1e})")
