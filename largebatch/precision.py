"""Numeric precision: Apex's optimisation levels on torch.amp, and loss scaling.

    level  --precision  forward                       parameters           BN     loss scale
    O0     fp32         fp32                          fp32                 fp32   none
    O1     amp          autocast fp16                 fp32                 fp32   dynamic
    -      amp-bf16     autocast bf16                 fp32                 fp32   none
    O2     -            fp16 copy of the weights      fp32 (the masters)   fp32   dynamic
    O3     fp16         fp16                          fp16, no masters     fp16   none (1.0)
    -      bf16         bf16                          bf16, no masters     bf16   none

O2 keeps the fp32 master weights as the model's own parameters and runs each forward pass
on an fp16 cast of them (batch norm excepted), so gradients arrive in the fp32 parameters
through the cast's backward: the engine's hooks, LARS and the checkpoints all see one set of
fp32 weights, and no second optimizer has to mirror them.

Loss scaling happens around the engine's gradient averaging: scale the loss, backward,
reduce (the allreduce), unscale, then step. A step whose gradients hold an inf or NaN is
skipped on every rank (the averaged gradients are identical, so all ranks agree) and the
scale is lowered; the optimizer never sees scaled gradients, so LARS's trust ratio does not
depend on the scale.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.func import functional_call

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Policy:
    name: str
    autocast: torch.dtype | None = None  # dtype of autocast regions (O1, amp-bf16)
    cast_model: torch.dtype | None = None  # dtype the forward pass computes in (O2, O3, bf16)
    master_weights: bool = False  # O2: parameters stay fp32, forward runs on a cast copy
    keep_bn_fp32: bool = True
    loss_scale: str | float | None = None  # "dynamic", a fixed number, or None

    @property
    def needs_gpu(self) -> bool:
        """fp16 compute is for GPUs; bf16 and fp32 run anywhere."""
        return torch.float16 in (self.autocast, self.cast_model)


LEVELS = {
    "O0": Policy("O0"),
    "O1": Policy("O1", autocast=torch.float16, loss_scale="dynamic"),
    "O2": Policy("O2", cast_model=torch.float16, master_weights=True, keep_bn_fp32=True, loss_scale="dynamic"),
    "O3": Policy("O3", cast_model=torch.float16, keep_bn_fp32=False),
}
PRECISIONS = {
    "fp32": LEVELS["O0"],
    "amp": LEVELS["O1"],
    "amp-bf16": Policy("amp-bf16", autocast=torch.bfloat16),
    "fp16": LEVELS["O3"],
    "bf16": Policy("bf16", cast_model=torch.bfloat16, keep_bn_fp32=False),
}


def resolve_policy(
    precision: str | None, opt_level: str | None, keep_bn_fp32: bool | None, loss_scale: str | None
) -> Policy:
    """The policy the flags ask for; raises ValueError with a one-line reason."""
    if precision and opt_level:
        raise ValueError("give --precision or --opt-level, not both")
    policy = LEVELS[opt_level] if opt_level else PRECISIONS[precision or "fp32"]
    changes: dict[str, bool | str | float] = {}
    if keep_bn_fp32 is not None:
        if policy.cast_model is None:
            raise ValueError(f"--keep-batchnorm-fp32 applies to O2, O3, fp16 and bf16, not {policy.name}")
        changes["keep_bn_fp32"] = keep_bn_fp32
    if loss_scale is not None:
        if torch.float16 not in (policy.autocast, policy.cast_model):
            raise ValueError(f"--loss-scale applies to fp16 levels (O1, O2, O3); {policy.name} needs none")
        scale: str | float = loss_scale
        if loss_scale != "dynamic":
            try:
                scale = float(loss_scale)
            except ValueError:
                raise ValueError(f"--loss-scale must be 'dynamic' or a positive number, got {loss_scale!r}") from None
            if not scale > 0:
                raise ValueError(f"--loss-scale must be positive, got {loss_scale}")
        changes["loss_scale"] = scale
    return Policy(**{**policy.__dict__, **changes})


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm))


class LossScaler:
    """Dynamic (or fixed) loss scale kept on the device. Growth and back-off follow
    torch.amp.GradScaler (x2 after 2000 clean steps, x0.5 on overflow); unlike it, this one
    also unscales fp16 gradients, which pure-fp16 (O3) training has."""

    def __init__(self, init: float, dynamic: bool, device: torch.device, growth_interval: int = 2000):
        self.dynamic, self.growth_interval = dynamic, growth_interval
        self.scale = torch.full((), float(init), dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def unscale_(self, params) -> torch.Tensor:
        """Divide every gradient by the scale in place; returns a 1-element tensor > 0 if any
        gradient is not finite."""
        found_inf = torch.zeros(1, dtype=torch.float32, device=self.scale.device)
        inv_scale = self.scale.double().reciprocal().float().reshape(1)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        return found_inf

    def update(self, found_inf: torch.Tensor) -> None:
        if self.dynamic:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, 2.0, 0.5, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.cpu(), "growth_tracker": self.growth_tracker.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


class Precision:
    """Prepares the model for a policy, runs its forward pass, scales, unscales and steps."""

    def __init__(self, device: torch.device, policy: Policy = PRECISIONS["fp32"], channels_last: bool = False):
        self.device, self.policy, self.channels_last = device, policy, channels_last
        self.skipped_steps = 0
        self.scaler = None
        if policy.loss_scale is not None:
            dynamic = policy.loss_scale == "dynamic"
            self.scaler = LossScaler(2.0**16 if dynamic else float(policy.loss_scale), dynamic, device)
        self._cast: set[int] = set()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put the model in the policy's dtypes and memory format (before the engine wraps the optimizer)."""
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        dtype = self.policy.cast_model
        if dtype is None:
            return model
        keep = {
            f"{m_name}.{p_name}".lstrip(".")
            for m_name, m in model.named_modules()
            if _is_norm(m) and self.policy.keep_bn_fp32
            for p_name, _ in m.named_parameters(recurse=False)
        }
        if self.policy.master_weights:
            # By identity, not name: the forward pass may run through an engine's wrapper
            # (DDP), whose parameter names carry a prefix.
            self._cast = {id(p) for n, p in model.named_parameters() if n not in keep}
            if not self.policy.keep_bn_fp32:
                # BN computing in fp16 needs its running statistics in fp16 too; they are
                # buffers updated in place, so they live in that dtype rather than being cast.
                for m in model.modules():
                    if _is_norm(m):
                        for b in m.buffers(recurse=False):
                            if b.is_floating_point():
                                b.data = b.data.to(dtype)
            return model
        for m in model.modules():
            if not (_is_norm(m) and self.policy.keep_bn_fp32):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(dtype)
                for b in m.buffers(recurse=False):
                    if b.is_floating_point():
                        b.data = b.data.to(dtype)
        return model

    def track_copy(self, original: torch.nn.Module, copy: torch.nn.Module) -> None:
        """A copy of the prepared model (the weights' average) runs forward as the original."""
        for p, q in zip(original.parameters(), copy.parameters()):
            if id(p) in self._cast:
                self._cast.add(id(q))

    def forward(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.policy.cast_model is not None:
            images = images.to(self.policy.cast_model)
        with self.autocast():
            if self._cast:
                dtype = self.policy.cast_model
                weights = {n: (p.to(dtype) if id(p) in self._cast else p) for n, p in model.named_parameters()}
                return functional_call(model, {**weights, **dict(model.named_buffers())}, (images,))
            return model(images)

    def autocast(self):
        if self.policy.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.policy.autocast)

    def backward(self, loss: torch.Tensor) -> None:
        (loss.float() * self.scaler.scale if self.scaler is not None else loss).backward()

    def step(self, optimizer, step) -> bool:
        """Unscale ``optimizer``'s averaged gradients and call ``step()``. Returns False when
        the gradients overflowed and the step was skipped (weights, momentum and schedule
        untouched)."""
        if self.scaler is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            found_inf = self.scaler.unscale_(params)
            self.scaler.update(found_inf)
            if found_inf.item() > 0:  # the one host sync a scaled step needs
                self.skipped_steps += 1
                return False
        step()
        return True

    def scalars(self) -> dict:
        if self.scaler is None:
            return {}
        return {"train/loss_scale": self.scaler.scale.item(), "train/skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict:
        if self.scaler is None:
            return {}
        return {**self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.scaler is not None:
            self.scaler.load_state_dict(state)
            self.skipped_steps = int(state.get("skipped_steps", 0))
