"""Shared machinery of the tokenized datamodules: read once, tokenize once, cache, split, load."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_bigmodel.datamodules._records import Record, read_records
from lit_bigmodel.datamodules._sampling import build_loader
from lit_bigmodel.datamodules.tokenization import load_tokenizer
from lit_bigmodel.errors import ConfigurationError, DataError

Split = Literal["train", "val", "test"]
Overflow = Literal["error", "truncate", "drop"]
_OVERFLOW = ("error", "truncate", "drop")
_CACHE_VERSION = 1


class TokenizedDataModule(L.LightningDataModule):
    """Base of the datamodules that turn records into token ids.

    Subclasses implement ``encode(record, where)`` (one record → a dict of token lists, or raise a
    `DataError` naming ``where``) and may override ``load_records(split)`` to generate data instead
    of reading ``{split}_file``.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        val_fraction: float = 0.1,
        max_length: int | None = None,
        overflow: Overflow = "error",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if not 0.0 <= val_fraction < 1.0:
            problems.append(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
        if max_length is not None and max_length < 1:
            problems.append(f"`max_length` must be a positive integer or None, got {max_length!r}.")
        if overflow not in _OVERFLOW:
            problems.append(f"`overflow` must be one of {_OVERFLOW}, got {overflow!r}.")
        if batch_size < 1:
            problems.append(f"`batch_size` must be >= 1, got {batch_size!r}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            problems.append(f"`eval_batch_size` must be >= 1 or None, got {eval_batch_size!r}.")
        if num_workers < 0:
            problems.append(f"`num_workers` must be >= 0, got {num_workers!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.tokenizer = load_tokenizer(tokenizer)
        self.files: dict[str, str | None] = {"train": train_file, "val": val_file, "test": test_file}
        self.val_fraction = val_fraction
        tokenizer_max = self.tokenizer.model_max_length
        self.max_length = (
            max_length if max_length is not None else (tokenizer_max if tokenizer_max < 1_000_000 else None)
        )
        self.overflow = overflow
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    # ----------------------------------------------------------------- hooks for subclasses
    def load_records(self, split: Split) -> list[tuple[str, Record]] | None:
        """Records of ``split`` as ``(where, record)`` pairs, or None if the split has no source."""
        path = self.files[split]
        if path is None:
            return None
        return [(f"{path} line {line}", record) for line, record in read_records(path)]

    def encode(self, record: Record, where: str) -> dict[str, Any]:
        """Turn one record into token lists; raise `DataError` mentioning ``where`` on bad input."""
        raise NotImplementedError

    def collate_fn(self, split: Split) -> Callable[[list[Any]], Any]:
        raise NotImplementedError

    def prepare_split(self, split: Split, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Last transformation of a tokenized split (packing, for instance); identity by default."""
        return examples

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if "train" not in self.datasets:
            train = self._tokenized("train")
            if train is None:
                raise ConfigurationError("`train_file` is required: the training split has no source.")
            val = self._tokenized("val")
            if val is None and self.val_fraction > 0:
                order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
                n_val = max(1, round(len(train) * self.val_fraction))
                if n_val >= len(train):
                    raise DataError(
                        f"the training split has {len(train)} example(s): too few to hold out a validation split."
                    )
                val = [train[i] for i in sorted(order[:n_val])]
                train = [train[i] for i in sorted(order[n_val:])]
            self.datasets["train"] = self.prepare_split("train", train)
            if val is not None:
                self.datasets["val"] = val
        if stage in ("test", None) and "test" not in self.datasets:
            test = self._tokenized("test")
            if test is not None:
                self.datasets["test"] = test

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    # ----------------------------------------------------------------- internals
    def _loader(self, split: Split, batch_size: int, shuffle: bool) -> DataLoader[Any]:
        if split not in self.datasets:
            self.setup("test" if split == "test" else "fit")
        if split not in self.datasets:
            raise ConfigurationError(
                f"no {split} data: set `{split}_file`" + (" or `val_fraction` > 0." if split == "val" else ".")
            )
        return build_loader(
            self.datasets[split],  # type: ignore[arg-type]
            batch_size=batch_size,
            collate_fn=self.collate_fn(split),
            trainer=self.trainer,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
        )

    def _tokenized(self, split: Split) -> list[dict[str, Any]] | None:
        records = self.load_records(split)
        if records is None:
            return None
        cache_path = self._cache_path(split, records)
        if cache_path is not None and os.path.isfile(cache_path):
            return torch.load(cache_path, weights_only=True)
        examples, dropped = [], 0
        for where, record in records:
            example = self._fit_length(self.encode(record, where), where)
            if example is None:
                dropped += 1
            else:
                examples.append(example)
        if dropped:
            rank_zero_warn(f"{split} split: dropped {dropped} example(s) longer than max_length={self.max_length}.")
        if not examples:
            raise DataError(f"the {split} split holds no usable examples (empty dataset).")
        if cache_path is not None:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            tmp = f"{cache_path}.tmp{os.getpid()}"
            torch.save(examples, tmp)
            os.replace(tmp, cache_path)  # atomic: a cache file is whole or absent
        return examples

    def _fit_length(self, example: dict[str, Any], where: str) -> dict[str, Any] | None:
        length = len(example["input_ids"])
        if self.max_length is None or length <= self.max_length:
            return example
        if self.overflow == "error":
            raise DataError(
                f"{where}: the example has {length} tokens, more than max_length={self.max_length}. "
                "Raise `max_length` (up to the model's maximum), or set `overflow` to 'truncate' or 'drop'."
            )
        if self.overflow == "drop":
            return None
        cut = {key: value[: self.max_length] if isinstance(value, list) else value for key, value in example.items()}
        if "labels" in cut and all(label == -100 for label in cut["labels"]):
            return None  # the prompt alone fills max_length: nothing left to learn from
        if "prompt_length" in cut:
            cut["prompt_length"] = min(cut["prompt_length"], self.max_length)
        return cut

    def _cache_path(self, split: str, records: list[tuple[str, Record]]) -> str | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256()
        tok = self.tokenizer
        fingerprint = {
            "version": _CACHE_VERSION,
            "class": type(self).__name__,
            "tokenizer": [type(tok).__name__, tok.name_or_path, len(tok), getattr(tok, "chat_template", None)],
            "settings": self._cache_settings(),
        }
        digest.update(json.dumps(fingerprint, sort_keys=True, default=str).encode())
        digest.update(json.dumps(sorted(tok.get_vocab().items())).encode())
        digest.update(json.dumps([record for _, record in records], sort_keys=True, default=str).encode())
        return os.path.join(self.cache_dir, f"{split}-{digest.hexdigest()[:20]}.pt")

    def _cache_settings(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "overflow": self.overflow}
