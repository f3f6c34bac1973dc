"""What counts as an optimizer step (shared by `LRDecay` and `PrecisionMonitor`).

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

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


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
