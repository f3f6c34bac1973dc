"""Padding-free batches: the real tokens of a causal-LM batch in one row, positions restarting per example.

The layout of Hugging Face's ``DataCollatorWithFlattening``: no padding token is computed, and a
model that attends through flash attention's variable-length kernels (``attn_implementation=
"flash_attention_2"``) keeps the examples apart from the position ids (or from ``cu_seq_lens``,
which also spares it deriving the boundaries on the device). ``sdpa`` / ``eager`` attention build
a block-diagonal mask from the position ids instead: correct, but quadratic in the row's length.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.losses import IGNORE_INDEX


def flatten_batch(batch: dict[str, torch.Tensor], max_length: int | None = None) -> dict[str, Any]:
    """Flatten a padded or packed causal-LM batch ``(B, T)`` into one row ``(1, N)`` of its N real tokens.

    Real tokens are those with ``attention_mask`` 1 (padded batches; all tokens without a mask) or
    ``document_ids`` >= 0 (packed rows, whose position ids already restart per example). The first
    token of every example gets label -100, so the previous example's last token is never trained
    to predict it; the loss is therefore the padded batch's loss.

    Args:
        batch: ``input_ids``, ``labels`` and ``attention_mask`` or ``document_ids`` / ``position_ids``.
        max_length: the longest example the model accepts (checked here; the row itself may be longer).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` ``(1, N)``; ``cu_seq_lens`` ``(E + 1,)`` int32, the
        example boundaries; ``max_length``, the longest example (an int). Other keys are dropped.

    Raises:
        ConfigurationError: an example is longer than ``max_length``.

    Example::

        flat = flatten_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
        flat["position_ids"]   # tensor([[0, 1, 2, 0, 1, ...]])
    """
    input_ids = batch["input_ids"]  # (B, T)
    if "document_ids" in batch:  # packed rows
        keep = batch["document_ids"] >= 0
        positions = batch["position_ids"]
    else:
        mask = batch.get("attention_mask")
        keep = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        positions = keep.long().cumsum(1) - 1  # 0, 1, ... from each row's first real token
    ids, labels, positions = input_ids[keep], batch["labels"][keep].clone(), positions[keep]  # (N,)
    starts = positions == 0
    labels[starts] = IGNORE_INDEX
    boundaries = torch.cat([starts.nonzero()[:, 0], torch.tensor([ids.numel()])])  # (E + 1,)
    longest = int(boundaries.diff().max()) if boundaries.numel() > 1 else 0
    if max_length is not None and longest > max_length:
        raise ConfigurationError(
            f"a batch holds an example of {longest} tokens but the model accepts at most {max_length}; "
            "lower the datamodule's `max_length` or set its `overflow`."
        )
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "position_ids": positions[None],
        "cu_seq_lens": boundaries.to(torch.int32),
        "max_length": longest,
    }
