"""Collators: dynamic padding to the longest row of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lit_bigmodel.losses import IGNORE_INDEX


def pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Stack integer rows into a ``(B, max_len)`` tensor, padding with ``value`` on the right (or left)."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            if left:
                out[i, width - len(row) :] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def stack_tokens(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fixed-length token rows → ``{"tokens": (B, T)}`` (the batches of SeqGAN's datamodules)."""
    return {"tokens": torch.stack(batch)}


class CausalLMCollator:
    """Pad causal-LM examples; for evaluation also emit left-padded prompts and the target completions.

    Output keys: ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and padding), and
    ``position_ids`` / ``document_ids`` for packed rows. With ``with_prompts=True`` (evaluation):
    ``prompt_input_ids`` / ``prompt_attention_mask`` (left-padded, ready for ``generate``) and
    ``completion_ids`` (the reference completion without EOS, -100-padded).
    """

    def __init__(self, pad_token_id: int, eos_token_id: int | None = None, with_prompts: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.with_prompts = with_prompts

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [ex["input_ids"] for ex in examples]
        batch = {
            "input_ids": pad(ids, self.pad_token_id),
            "attention_mask": pad([[1] * len(row) for row in ids], 0),
            "labels": pad([ex["labels"] for ex in examples], IGNORE_INDEX),
        }
        if "document_ids" in examples[0]:
            batch["position_ids"] = pad([ex["position_ids"] for ex in examples], 0)
            batch["document_ids"] = pad([ex["document_ids"] for ex in examples], -1)
        if self.with_prompts and all(ex.get("prompt_length", 0) > 0 for ex in examples):
            prompts = [ex["input_ids"][: ex["prompt_length"]] for ex in examples]
            completions = [self._strip_eos(ex["input_ids"][ex["prompt_length"] :]) for ex in examples]
            batch["prompt_input_ids"] = pad(prompts, self.pad_token_id, left=True)
            batch["prompt_attention_mask"] = pad([[1] * len(row) for row in prompts], 0, left=True)
            batch["completion_ids"] = pad(completions, IGNORE_INDEX)
        return batch

    def _strip_eos(self, row: Sequence[int]) -> list[int]:
        row = list(row)
        if row and self.eos_token_id is not None and row[-1] == self.eos_token_id:
            row = row[:-1]
        return row


class ClassificationCollator:
    """Pad ``input_ids`` (and ``token_type_ids`` if present); stack integer ``labels``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [ex["input_ids"] for ex in examples]
        batch = {
            "input_ids": pad(ids, self.pad_token_id),
            "attention_mask": pad([[1] * len(row) for row in ids], 0),
            "labels": torch.tensor([ex["label"] for ex in examples], dtype=torch.long),
        }
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = pad([ex["token_type_ids"] for ex in examples], 0)
        return batch
