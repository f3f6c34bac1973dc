"""Closed-form learning-rate schedules: the one formula behind `SFTModule`'s built-in schedule and `LRDecay`.

``LRSchedule(...).lr(t, base_lr)`` is the learning rate of optimizer step ``t`` (0-based). The warmup is
``base_lr · (t + 1) / W`` for the steps ``t < W``, in both users.

**Who owns the learning rate.** A callback that sets the learning rate (`LRDecay`) owns it for the
optimizers it schedules. A module then installs no scheduler of its own for those optimizers: it asks
``callback_sets_learning_rate(self.trainer, optimizer_index)`` in ``configure_optimizers`` and returns the
bare optimizer (`SFTModule` and its subclasses do). A module that still returns a scheduler is overridden
with a warning: the callback reads the base rate from the param group's ``initial_lr`` (where torch's
schedulers keep the rate they started from) or else ``lr``, sets the rate before every optimizer step and
again after Lightning steps the scheduler, so the steps and the optimizer after fit carry the callback's
rates.

Example::

    from lit_bigmodel.schedules import LRSchedule

    schedule = LRSchedule("cosine", warmup_steps=100, total_steps=1000, min_lr=0.1)
    factors = [schedule.lr(t, 1.0) for t in range(1000)]   # 0.01, 0.02, ..., 1.0, ..., 0.1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

ModuleScheduleName = Literal["cosine", "linear", "constant"]  # the built-in schedules of `SFTModule`
SCHEDULES = ("constant", "step", "exponential", "inverse_time", "cosine", "linear", "wsd", "plateau")
NEEDS_TOTAL_STEPS = ("cosine", "linear", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class LRSchedule:
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


def callback_sets_learning_rate(trainer: Any, optimizer_index: int = 0) -> bool:
    """Whether a callback of ``trainer`` owns the learning rate of optimizer ``optimizer_index`` (see the module docstring).

    A callback owns it when it has a method ``sets_learning_rate(optimizer_index) -> bool`` that says so
    (`LRDecay` has one).

    Example::

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.learning_rate)
            if callback_sets_learning_rate(self.trainer):
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": ...}
    """
    for callback in getattr(trainer, "callbacks", None) or ():
        sets_learning_rate = getattr(callback, "sets_learning_rate", None)
        if callable(sets_learning_rate) and sets_learning_rate(optimizer_index):
            return True
    return False
