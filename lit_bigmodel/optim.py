"""The optimizer of `SFTModule` and its subclasses: AdamW with weight decay only where it belongs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lit_bigmodel._sharding import offloads_optimizer


def decay_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups: ``weight_decay`` on weights, none on biases, norms and embeddings.

    Decided by module type and parameter name, not by ``param.ndim`` (under ZeRO-3 and FSDP a parameter
    is a flat shard). Tied parameters (embedding = LM head) are listed once, frozen ones not at all;
    an empty group is left out (DeepSpeed's optimizer wrappers break on one).

    Example::

        torch.optim.AdamW(decay_groups([model], weight_decay=0.01), lr=1e-4)
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in (m for root in modules for m in root.modules()):
        is_norm_or_embedding = isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_norm_or_embedding or name.endswith("bias") else decay).append(param)
    return [{"params": params, "weight_decay": wd} for params, wd in ((decay, weight_decay), (no_decay, 0.0)) if params]


def adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], trainer: Any = None
) -> torch.optim.Optimizer:
    """AdamW over ``groups``: fused when every parameter is on CUDA; DeepSpeed's CPU Adam (AdamW mode) when
    ``trainer``'s DeepSpeed strategy offloads the optimizer (DeepSpeed refuses a torch optimizer there).

    Example::

        optimizer = adamw(decay_groups([model], 0.01), lr=1e-4, betas=(0.9, 0.999))
    """
    if offloads_optimizer(trainer):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
