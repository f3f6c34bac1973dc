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

IGNORE_INDEX = -100


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


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``(B, 1, T, T)``: causal, within one document, never onto padding (-1).

    Example::

        block_causal_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0].int()
    """
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    valid = (document_ids >= 0)[:, None, :]  # (B, 1, T) keys
    mask = same & causal & valid
    # Padding queries attend to themselves only, so no row is empty (softmax of all -inf is NaN).
    eye = torch.eye(length, dtype=torch.bool, device=document_ids.device)
    mask = mask | (eye & (document_ids < 0)[:, :, None])
    return mask[:, None]
