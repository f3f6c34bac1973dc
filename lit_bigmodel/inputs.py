"""`network_inputs`: the keyword arguments of a Hugging Face network's forward for one of our batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lit_bigmodel.datamodules.packing import packed_attention_inputs
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.nets.builders import max_positions


def network_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``model(**network_inputs(model, batch))`` for a padded, packed (``document_ids``) or padding-free batch.

    Packed rows get a block-causal mask in the form ``model``'s attention implementation takes
    (`packed_attention_inputs`); padding-free rows get their position ids (and, under flash attention,
    the sequence boundaries the datamodule computed, so none are derived on the device).

    Raises:
        ConfigurationError: a padded or packed batch is longer than the model's maximum positions.

    Example::

        logits = model(**network_inputs(model, batch)).logits
    """
    input_ids = batch["input_ids"]  # (B, T)
    limit = max_positions(model)
    flattened = "cu_seq_lens" in batch  # padding-free: each example was checked against the limit
    if limit is not None and not flattened and input_ids.shape[1] > limit:
        raise ConfigurationError(
            f"a batch holds sequences of {input_ids.shape[1]} tokens but the model accepts at most {limit}; "
            "lower the datamodule's `max_length` or set its `overflow`."
        )
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if "attention_mask" in batch:  # absent: no padding (random-token benchmarks, padding-free rows)
        kwargs["attention_mask"] = batch["attention_mask"]
    if "document_ids" in batch:  # packed rows: a mask (flash: boundaries) that keeps the examples apart
        kwargs.update(packed_attention_inputs(batch["document_ids"], batch["position_ids"], model))
    elif "position_ids" in batch:  # padding-free: one row, positions restart at every example
        kwargs["position_ids"] = batch["position_ids"]
        kwargs["use_cache"] = False  # with a cache, Hugging Face models do not look for packed sequences
        if "cu_seq_lens" in batch and "flash" in str(
            getattr(getattr(model, "config", None), "_attn_implementation", "")
        ):
            # variable-length flash attention without deriving the boundaries on the device (a host sync)
            kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = batch["cu_seq_lens"]
            kwargs["max_length_q"] = kwargs["max_length_k"] = int(batch["max_length"])
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    return kwargs
