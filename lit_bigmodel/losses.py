"""Losses as small, tested functions. Shapes: B batch, T time, V vocabulary, C classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the labelled positions (completion-only loss).

    Args:
        logits: ``(B, T, V)`` scores for the token after each position.
        labels: ``(B, T)`` token ids aligned with the inputs (shifted here, as Hugging Face does);
            ``ignore_index`` marks prompt and padding positions, which contribute nothing.

    Returns:
        ``(loss, num_tokens)``: the mean over labelled tokens (0 if there are none) and their count.

    Example::

        loss, n = causal_lm_loss(torch.randn(2, 5, 11), torch.tensor([[-100, -100, 3, 4, 2]] * 2))
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    total = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=ignore_index, reduction="sum")
    num_tokens = (shift_labels != ignore_index).sum()
    return total / num_tokens.clamp(min=1), num_tokens
