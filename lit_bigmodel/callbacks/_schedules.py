"""Closed-form learning-rate schedules, and what counts as an optimizer step (shared by `LRDecay` and `PrecisionMonitor`).

A *step* here is an optimizer step that really updated parameters: ``optimizer.step()`` ran and at least
one parameter had a gradient. Three things that look like steps are not:

- a micro-batch of gradient accumulation (the optimizer is not called);
- a step that the fp16 ``GradScaler`` skipped because of inf/NaN gradients (``scaler.step`` does not
  call ``optimizer.step()``; DeepSpeed's fp16 optimizers likewise do not call their inner optimizer);
- a step whose gradients were dropped (``p.grad = None``), e.g. by ``PrecisionMonitor(policy="skip")``.

`watch_real_steps` registers a per-instance step post-hook (``Optimizer.register_step_post_hook``) on
the torch optimizer: nothing global is patched, and automatic and manual optimization are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

SCHEDULES = ("constant", "step", "exponential", "inverse_time", "cosine", "linear", "wsd", "plateau")
NEEDS_TOTAL_STEPS = ("cosine", "linear", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class Schedule:
    """One schedule with its settings resolved; ``lr(t, base_lr)`` is the learning rate of step ``t`` (0-based).

    With ``W = warmup_steps``: steps ``t < W`` use ``base_lr · (t + 1) / W``; after the warmup the decay
    runs on ``τ = t − W`` (``wsd`` uses the absolute step, see `_wsd`). ``min_lr`` is a floor, and the
    end point of ``cosine`` / ``linear`` / ``wsd`` at ``total_steps``.
    """

    name: str
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr: float = 0.0
    decay_rate: float = 1.0
    decay_steps: int = 1
    power: float = 1.0
    decay_start: int = 0
    decay_shape: str = "linear"

    def lr(self, step: int, base_lr: float, plateau_scale: float = 1.0) -> float:
        """The learning rate of step ``step`` for a group whose base rate is ``base_lr``."""
        peak = base_lr * plateau_scale
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        tau = step - self.warmup_steps
        if self.name in ("constant", "plateau"):
            return max(self.min_lr, peak) if self.name == "plateau" else peak
        if self.name == "step":
            return max(self.min_lr, peak * self.decay_rate ** (tau // self.decay_steps))
        if self.name == "exponential":
            return max(self.min_lr, peak * self.decay_rate ** (tau / self.decay_steps))
        if self.name == "inverse_time":
            return max(self.min_lr, peak / (1.0 + self.decay_rate * tau / self.decay_steps) ** self.power)
        assert self.total_steps is not None, f"schedule {self.name!r} needs total_steps"
        if self.name == "wsd":
            return self._wsd(step, peak)
        progress = min(tau, self.total_steps - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + (peak - self.min_lr) * _shape("cosine" if self.name == "cosine" else "linear", progress)

    def _wsd(self, step: int, peak: float) -> float:
        """Warmup–stable–decay: ``peak`` until ``decay_start``, then ``decay_shape`` down to ``min_lr`` at ``total_steps``."""
        assert self.total_steps is not None
        if step < self.decay_start:
            return peak
        span = max(1, self.total_steps - self.decay_start)
        progress = min(step - self.decay_start, span) / span
        return self.min_lr + (peak - self.min_lr) * _shape(self.decay_shape, progress)


def _shape(shape: str, progress: float) -> float:
    """Fraction of the way from ``min_lr`` to the peak left at ``progress`` ∈ [0, 1] of the decay."""
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    return 1.0 - progress


# ---------------------------------------------------------------------------- what counts as a step
def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The `torch.optim.Optimizer` that does the update: unwraps `LightningOptimizer` and DeepSpeed's optimizers."""
    for _ in range(4):  # LightningOptimizer → DeepSpeed wrapper → torch optimizer, at most
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        optimizer = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def has_grads(optimizer: Any) -> bool:
    """Whether any parameter of ``optimizer`` has a gradient (a Python check, no device sync)."""
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


def drop_grads(optimizer: Any) -> None:
    """Set every gradient of ``optimizer`` to None: its next ``step()`` then changes nothing, momentum included."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def watch_real_steps(optimizer: Any, on_step: Callable[[], None]) -> RemovableHandle:
    """Call ``on_step()`` after every step of ``optimizer`` that really updated parameters (see the module docstring).

    Raises:
        TypeError: ``optimizer`` is not, and does not wrap, a `torch.optim.Optimizer`.
    """
    inner = torch_optimizer(optimizer)
    if inner is None:
        raise TypeError(f"cannot watch the steps of {type(optimizer).__name__}: it does not wrap a torch optimizer.")

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if has_grads(opt):
            on_step()

    return inner.register_step_post_hook(hook)
