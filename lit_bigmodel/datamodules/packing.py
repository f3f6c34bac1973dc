"""Packing of short examples into full rows, and the attention mask that keeps them apart.

A packed row concatenates several examples. Each keeps its own position ids (restarting at 0),
its own document id (so attention never crosses from one example into another) and its own loss
mask; the first token of every example gets label -100, so the last token of the previous
example is never trained to predict it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.losses import IGNORE_INDEX

__all__ = ["block_causal_mask", "pack_examples", "packed_attention_inputs"]  # IGNORE_INDEX lives in losses


def pack_examples(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack tokenized examples (``input_ids``, ``labels``) into rows of at most ``max_length`` tokens.

    First-fit decreasing; examples are never split. Returns rows with ``input_ids``, ``labels``,
    ``position_ids`` and ``document_ids`` (0, 1, 2, … within a row).

    Example::

        rows = pack_examples([{"input_ids": [5, 6], "labels": [-100, 6]}] * 3, max_length=4)
        len(rows)   # 2
    """
    if max_length < 1:
        raise ValueError(f"`max_length` must be >= 1, got {max_length!r}.")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for index in order:
        length = len(examples[index]["input_ids"])
        if length > max_length:
            raise ValueError(f"example {index} has {length} tokens, more than the packing length {max_length}.")
        for slot, free in enumerate(room):
            if free >= length:
                rows[slot].append(index)
                room[slot] -= length
                break
        else:
            rows.append([index])
            room.append(max_length - length)
    packed = []
    for members in rows:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "document_ids": []}
        for doc, index in enumerate(sorted(members)):
            ids, labels = examples[index]["input_ids"], list(examples[index]["labels"])
            labels[0] = IGNORE_INDEX
            row["input_ids"] += ids
            row["labels"] += labels
            row["position_ids"] += list(range(len(ids)))
            row["document_ids"] += [doc] * len(ids)
        packed.append(row)
    return packed


def block_causal_mask(
    document_ids: torch.Tensor, dtype: torch.dtype | None = None, sliding_window: int | None = None
) -> torch.Tensor:
    """Attention mask ``(B, 1, T, T)``: causal, within one document, never onto padding (-1).

    With ``dtype=None`` a boolean mask (True = attend), the form ``sdpa`` takes. With a floating
    ``dtype`` an additive mask: 0 where a query attends, the dtype's minimum where it does not, the
    form eager attention adds to the scores (a boolean mask added to them would add 1 or 0). With
    ``sliding_window`` W, a query also sees only the W most recent keys, itself included.

    Example::

        block_causal_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0].int()
        block_causal_mask(torch.tensor([[0, 0, 1, -1]]), dtype=torch.bfloat16)  # 0 / -3.39e38
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigurationError(f"`dtype` must be a floating dtype or None, got {dtype!r}.")
    if sliding_window is not None and sliding_window < 1:
        raise ConfigurationError(f"`sliding_window` must be >= 1 or None, got {sliding_window!r}.")
    length = document_ids.shape[1]
    q = torch.arange(length, device=document_ids.device)[:, None]  # (T, 1) queries
    kv = torch.arange(length, device=document_ids.device)[None, :]  # (1, T) keys
    mask = _allowed(document_ids[:, :, None], document_ids[:, None, :], q, kv, sliding_window)  # (B, T, T)
    mask = mask[:, None]  # (B, 1, T, T)
    if dtype is None:
        return mask
    zero = torch.zeros((), dtype=dtype, device=document_ids.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def _allowed(
    query_doc: torch.Tensor, key_doc: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Whether query ``q`` (of document ``query_doc``) attends to key ``kv``; broadcasts over its arguments."""
    allowed = (query_doc == key_doc) & (kv <= q) & (key_doc >= 0)
    if window is not None:
        allowed = allowed & (q - kv < window)
    # Padding queries attend to themselves only, so no row is empty (softmax of all -inf is NaN).
    return allowed | ((q == kv) & (query_doc < 0))


def packed_attention_inputs(document_ids: torch.Tensor, position_ids: torch.Tensor, model: nn.Module) -> dict[str, Any]:
    """The attention keyword arguments that keep the examples of packed rows ``(B, T)`` apart in ``model``.

    The mask follows the model's ``config._attn_implementation``:

    - ``"sdpa"``: a boolean `block_causal_mask`;
    - ``"flex_attention"``: a ``BlockMask`` of the same pattern;
    - flash attention (a name containing ``"flash"``): ``attention_mask=None`` (a padding mask would
      send it down its padded path, across the examples) and the example boundaries over the
      flattened ``B·T`` tokens (``cu_seq_lens_q/k``, ``max_length_q/k``; each padding token is its own
      sequence) for its variable-length kernels; reading the longest example is one host sync;
    - anything else (``"eager"``, a model without a config): an additive `block_causal_mask` in the
      dtype of the model's parameters, as Hugging Face builds its own eager masks (under autocast too).

    A config's ``sliding_window`` narrows the mask of its sliding layers: of every layer, or, where
    ``layer_types`` mixes ``"full_attention"`` and ``"sliding_attention"`` layers, a mask per type
    (the dict such models take). Always ``position_ids``, restarting at 0 in every example.

    Raises:
        ConfigurationError: ``layer_types`` names an attention other than full and sliding.

    Example::

        kwargs = packed_attention_inputs(batch["document_ids"], batch["position_ids"], model)
        logits = model(input_ids=batch["input_ids"], **kwargs).logits
    """
    config = getattr(model, "config", None)
    attention = str(getattr(config, "_attn_implementation", None) or "")
    inputs: dict[str, Any] = {"position_ids": position_ids}
    if "flash" in attention:  # the kernel applies a sliding window itself
        starts = torch.ones_like(document_ids, dtype=torch.bool)  # (B, T)
        starts[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]) | (document_ids[:, 1:] < 0)
        flat_starts = starts.flatten().nonzero()[:, 0]  # (E,)
        end = torch.tensor([document_ids.numel()], device=document_ids.device)
        boundaries = torch.cat([flat_starts, end]).to(torch.int32)  # (E + 1,)
        inputs["attention_mask"] = None
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = boundaries
        inputs["max_length_q"] = inputs["max_length_k"] = int(boundaries.diff().max())
        return inputs

    def mask(window: int | None) -> Any:
        if attention == "sdpa":
            return block_causal_mask(document_ids, sliding_window=window)
        if attention == "flex_attention":
            return _flex_block_mask(document_ids, window)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return block_causal_mask(document_ids, dtype=dtype, sliding_window=window)

    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) else None
    layer_types = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    unknown = layer_types - {"full_attention", "sliding_attention"}
    if unknown:
        raise ConfigurationError(
            f"packed rows need full or sliding attention layers, but the model's `layer_types` holds {sorted(unknown)}; "
            "set the datamodule's packing=False."
        )
    masks = {kind: mask(window if kind == "sliding_attention" else None) for kind in sorted(layer_types)}
    inputs["attention_mask"] = next(iter(masks.values())) if len(masks) == 1 else masks
    return inputs


def _flex_block_mask(document_ids: torch.Tensor, window: int | None) -> Any:
    """`block_causal_mask` ``(B, 1, T, T)`` as flex attention's ``BlockMask``."""
    from torch.nn.attention.flex_attention import create_block_mask  # torch >= 2.5, as flex attention

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return _allowed(document_ids[b, q], document_ids[b, kv], q, kv, window)

    batch, length = document_ids.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=document_ids.device)
