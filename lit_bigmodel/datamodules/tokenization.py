"""Tokenizers that need no hub: a character-level tokenizer built locally, and one loader for the rest."""

from __future__ import annotations

import os
from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lit_bigmodel._paths import looks_like_local_path
from lit_bigmodel.errors import ConfigurationError, MissingPathError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def build_char_tokenizer(alphabet: Iterable[str], model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Build a character-level Hugging Face tokenizer over ``alphabet``, with no download.

    Ids 0–3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; then one id per distinct character in
    the order first seen. The result is a real ``PreTrainedTokenizerFast``: ``save_pretrained``
    writes it and ``AutoTokenizer.from_pretrained`` loads it back.

    Example::

        tok = build_char_tokenizer("0123456789+=")
        tok("12+7=").input_ids          # [5, 6, 15, 11, 16]
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
    for char in alphabet:
        if len(char) != 1:
            raise ConfigurationError(f"`alphabet` must hold single characters, got {char!r}.")
        vocab.setdefault(char, len(vocab))
    if len(vocab) == 4:
        raise ConfigurationError("`alphabet` must hold at least one character, got none.")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
    )


def load_tokenizer(tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Return ``tokenizer`` as is, or load it from a local directory (or a hub id) with ``AutoTokenizer``.

    A pad token is set to the EOS token when the tokenizer has none (GPT-2, Llama), as HF recipes do.
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tok = tokenizer
    else:
        name = os.fspath(tokenizer)
        if looks_like_local_path(name) and not os.path.isdir(name):
            raise MissingPathError(f"tokenizer directory {name!r} does not exist.")
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as err:
            if os.path.isdir(name):
                raise ConfigurationError(
                    f"tokenizer directory {name!r} could not be loaded: {type(err).__name__}: {err}"
                ) from err
            if not isinstance(err, (OSError, ValueError)):
                raise
            raise MissingPathError(
                f"tokenizer {name!r} is neither a local directory nor a model id that could be loaded ({err})."
            ) from err
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok
