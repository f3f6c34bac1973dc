"""The optimizer of `SFTModule` and its subclasses, and the package's one no-decay rule.

**The no-decay rule** (`no_decay`, used by `decay_groups` and by `L1L2(exclude_no_decay=True)`): a
parameter gets no weight decay (and no L1 / L2 penalty) when

- its module is an ``nn.Embedding`` / ``nn.EmbeddingBag``, or its module's class name contains ``norm``
  or ``embedding`` (``LayerNorm``, ``LlamaRMSNorm``, ``BatchNorm1d``, ``ViTEmbeddings``' own tokens), or
- its own name, split at ``_``, has a part ``bias``, ``embed``, ``embeds``, ``embedding`` or ``embeddings``
  (``bias``, ``bias_ih_l0`` of ``nn.LSTM``, ``conv_bias``, ``relative_position_bias_table``, ``pos_embed``).

Every other trainable parameter decays: the weights of linear, convolution and LSTM layers, and an
output layer (``lm_head``) unless it is tied to an embedding. A tied parameter follows the rule if any
of its owners does (an ``lm_head`` tied to ``wte`` is an embedding, whichever is declared first). The
rule reads module types and names, never ``param.ndim``: under ZeRO-3 and FSDP a parameter is a flat shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lit_bigmodel._sharding import offloads_optimizer

_NO_DECAY_NAME_PARTS = frozenset({"bias", "embed", "embeds", "embedding", "embeddings"})


def is_no_decay(module: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` owned directly by ``module`` is exempt from decay (the module docstring's rule).

    Example::

        is_no_decay(nn.LSTM(4, 4), "bias_ih_l0")   # True
    """
    kind = type(module).__name__.lower()
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or "norm" in kind or "embedding" in kind:
        return True
    return not _NO_DECAY_NAME_PARTS.isdisjoint(name.lower().split("_"))


def no_decay_parameters(modules: Iterable[nn.Module]) -> set[int]:
    """The ``id`` of every parameter of ``modules`` that `is_no_decay` exempts under any of its names (tied ones too).

    Example::

        exempt = no_decay_parameters([model])
        decayed = [p for p in model.parameters() if id(p) not in exempt]
    """
    return {
        id(param)
        for root in modules
        for module in root.modules()
        for name, param in module.named_parameters(recurse=False)
        if is_no_decay(module, name)
    }


def decay_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups: ``weight_decay`` on weights, none on biases, norms and embeddings (the module docstring's rule).

    Tied parameters (embedding = LM head) are listed once, frozen ones not at all; an empty group is
    left out (DeepSpeed's optimizer wrappers break on one).

    Example::

        torch.optim.AdamW(decay_groups([model], weight_decay=0.01), lr=1e-4)
    """
    roots = list(modules)
    exempt = no_decay_parameters(roots)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for param in (p for root in roots for p in root.parameters()):
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if id(param) in exempt else decay).append(param)
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
