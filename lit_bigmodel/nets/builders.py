"""Build a Hugging Face model from a local directory, a hub id, a `PretrainedConfig` or a factory."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any, Literal, Union

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from lit_bigmodel._paths import looks_like_local_path
from lit_bigmodel.errors import ConfigurationError, MissingPathError

Task = Literal["causal_lm", "sequence_classification"]
ModelSource = Union[PretrainedConfig, str, os.PathLike, Callable[[], nn.Module]]
_AUTO = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}


def build_model(
    source: ModelSource,
    task: Task,
    num_labels: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    load_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Return the network ``source`` describes, for ``task``.

    - a directory written by ``save_pretrained`` (or, with a network, a hub id): loaded with its weights;
    - a ``PretrainedConfig``: built with fresh weights and the config's ``attn_implementation`` (if
      none was set, transformers' default); with a ``tokenizer``, the vocabulary size and
      the pad / BOS / EOS ids are taken from it, so a config and a locally built tokenizer agree;
    - a callable: called with no arguments, its result returned as is.

    ``load_kwargs`` go to ``from_pretrained`` (e.g. ``quantization_config``, ``device_map``); they need a
    directory or hub id.

    Raises:
        MissingPathError: a local path that does not exist, or a name that cannot be loaded.

    Example::

        model = build_model(GPT2Config(n_layer=2, n_embd=64, n_head=2), "causal_lm", tokenizer=tok)
    """
    if task not in _AUTO:
        raise ConfigurationError(f"`task` must be one of {tuple(_AUTO)}, got {task!r}.")
    label_kwargs: dict[str, Any] = (
        {"num_labels": num_labels} if task == "sequence_classification" and num_labels else {}
    )
    if load_kwargs and not isinstance(source, (str, os.PathLike)):
        raise ConfigurationError(
            f"loading options {sorted(load_kwargs)} need `model` to be a directory or hub id, got {type(source).__name__}."
        )
    if isinstance(source, PretrainedConfig):
        # A deep copy, so the caller's config stays unchanged; it keeps what `to_dict` leaves out,
        # such as the attention implementation asked for with `attn_implementation=`.
        config = copy.deepcopy(source)
        if tokenizer is not None:
            config.vocab_size = len(tokenizer)
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                setattr(config, name, getattr(tokenizer, name))
        for key, value in label_kwargs.items():
            setattr(config, key, value)
        return _AUTO[task].from_config(config)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if looks_like_local_path(name) and not os.path.isdir(name):
            raise MissingPathError(f"model directory {name!r} does not exist.")
        try:
            return _AUTO[task].from_pretrained(name, **label_kwargs, **(load_kwargs or {}))
        except (OSError, ValueError) as err:
            if os.path.isdir(name):
                raise ConfigurationError(
                    f"model directory {name!r} could not be loaded ({err}); check its config.json and weights."
                ) from err
            raise MissingPathError(
                f"model {name!r} is neither a local model directory nor a model id that could be loaded ({err})."
            ) from err
    if callable(source):
        model = source()
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"the model factory must return an nn.Module, got {type(model).__name__}.")
        return model
    raise ConfigurationError(
        f"`model` must be a directory, a PretrainedConfig or a factory returning an nn.Module, got {type(source).__name__}."
    )


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model`` accepts, from its config (None if unknown or unlimited)."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
