"""Shared machinery of the tokenized datamodules: read once, tokenize once, cache, split, load."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_bigmodel.augmentation import EDA
from lit_bigmodel.datamodules._augmented import AugmentedSplit
from lit_bigmodel.datamodules._records import (
    Record,
    check_columns,
    check_dataset_argument,
    dataset_records,
    is_hf_dataset,
    load_dataset_argument,
    read_records,
    select_splits,
)
from lit_bigmodel.datamodules._sampling import build_loader
from lit_bigmodel.datamodules.tokenization import load_tokenizer
from lit_bigmodel.errors import ConfigurationError, DataError
from lit_bigmodel.losses import IGNORE_INDEX

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
Overflow = Literal["error", "truncate", "drop"]
_OVERFLOW = ("error", "truncate", "drop")
_CACHE_VERSION = 1

DataSource = str | os.PathLike[str] | Any
"""A ``*_file`` value: a path (``str`` / ``os.PathLike``) or a ``datasets.Dataset`` (typed ``Any``: ``datasets`` is optional)."""


class _Tokenized(NamedTuple):
    examples: list[dict[str, Any]]
    cache_path: str | None
    from_cache: bool


class TokenizedDataModule(L.LightningDataModule):
    """Base of the datamodules that turn records into token ids.

    Subclasses implement ``encode(record, where)`` (one record → a dict of token lists, or raise a
    `DataError` naming ``where``) and may override ``load_records(split)`` to generate data instead
    of reading ``{split}_file`` / ``dataset``, ``required_columns`` to check a dataset's columns
    up front, and ``assemble_splits`` to shape the tokenized splits. Subclasses whose records hold
    text implement ``augment_record`` to accept ``augment``.

    Records come from files (``train_file``, ``val_file``, ``test_file``: JSONL or CSV paths, or
    ``datasets.Dataset`` objects) or from ``dataset`` (a ``DatasetDict``, a ``Dataset``, a dict of
    ``datasets.load_dataset`` arguments or a folder saved with ``save_to_disk``), whose splits
    ``dataset_splits`` names. `validate_inputs` reads, parses and tokenizes every split and writes
    nothing; `setup` does the same (once), then writes the tokenized cache files of ``cache_dir``.

    With ``augment`` (an `EDA`), every training epoch serves each training example once as it is
    and ``augment.num_aug`` times rewritten by ``augment_record`` and tokenized when loaded; the
    rewrites depend only on ``(seed, epoch, record, copy)``, so a resumed run sees the batches of an
    uninterrupted one. A rewrite longer than ``max_length`` is truncated with
    ``overflow="truncate"``, else replaced by the original example. Validation and test data are
    never augmented.

    Example::

        dm = InstructionDataModule("gpt2", train_file="train.jsonl", cache_dir="cache")
        dm.validate_inputs()   # every error setup would raise, nothing written
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        train_file: DataSource = None,
        val_file: DataSource = None,
        test_file: DataSource = None,
        val_fraction: float = 0.1,
        max_length: int | None = None,
        overflow: Overflow = "error",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        dataset: Any = None,
        dataset_splits: Mapping[str, str] | None = None,
        augment: EDA | None = None,
    ) -> None:
        super().__init__()
        problems = []
        files: dict[Split, DataSource] = {"train": train_file, "val": val_file, "test": test_file}
        for split, source in files.items():
            if source is not None and not isinstance(source, (str, os.PathLike)) and not is_hf_dataset(source):
                problems.append(
                    f"`{split}_file` must be a file path or a `datasets.Dataset`, got {type(source).__name__}."
                )
        dataset_problem = check_dataset_argument(dataset)
        if dataset_problem:
            problems.append(dataset_problem)
        given_files = [f"`{split}_file`" for split, source in files.items() if source is not None]
        if dataset is not None and given_files:
            problems.append(f"give `dataset` or {' / '.join(given_files)}, not both.")
        if dataset_splits is not None:
            if dataset is None:
                problems.append("`dataset_splits` names the splits of `dataset`, but `dataset` is None.")
            unknown = sorted(set(dataset_splits) - set(SPLITS))
            if unknown or not all(isinstance(name, str) for name in dataset_splits.values()):
                problems.append(
                    f"`dataset_splits` maps 'train' / 'val' / 'test' to split names, got {dict(dataset_splits)!r}."
                )
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
        if augment is not None and not isinstance(augment, EDA):
            problems.append(f"`augment` must be an `EDA` or None, got {augment!r}.")
        elif augment is not None and type(self).augment_record is TokenizedDataModule.augment_record:
            problems.append(
                f"`augment` rewrites the text of each record, but {type(self).__name__} has no text field to "
                "rewrite; augmentation works with TextClassificationDataModule and InstructionDataModule."
            )
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.tokenizer = load_tokenizer(tokenizer)
        self.files = files
        self.dataset = dataset
        self.dataset_splits = dict(dataset_splits) if dataset_splits is not None else None
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
        self.augment = augment
        self.datasets: dict[str, list[dict[str, Any]]] = {}
        self._train_records: list[tuple[str, Record]] = []
        self._dataset_sources: dict[str, tuple[str, Any]] | None = None
        self._unwritten: list[_Tokenized] = []

    # ----------------------------------------------------------------- hooks for subclasses
    def load_records(self, split: Split) -> list[tuple[str, Record]] | None:
        """Records of ``split`` as ``(where, record)`` pairs, or None if the split has no source.

        ``where`` names the file and line (``train.jsonl line 3``) or the dataset split and row
        (``dataset split 'validation' row 7``), for the errors of `encode`.
        """
        source = self._source(split)
        if source is None:
            return None
        if isinstance(source, tuple):
            name, dataset = source
            check_columns(dataset, self.required_columns(), name, self.columns_hint())
            return dataset_records(dataset, name)
        return [(f"{source} line {line}", record) for line, record in read_records(source, f"`{split}_file`")]

    def required_columns(self) -> Sequence[tuple[str, ...]]:
        """Column sets a dataset split may have (it needs every column of one of them); none are checked by default."""
        return ()

    def columns_hint(self) -> str:
        """The sentence that ends a missing-column error: what a row needs."""
        return "see the datamodule's documentation for the columns it reads."

    def encode(self, record: Record, where: str) -> dict[str, Any]:
        """Turn one record into token lists; raise `DataError` mentioning ``where`` on bad input."""
        raise NotImplementedError

    def collate_fn(self, split: Split) -> Callable[[list[Any]], Any]:
        raise NotImplementedError

    def augment_record(self, record: Record, rewrite: Callable[[str], str]) -> Record:
        """A copy of ``record`` whose augmentable text fields went through ``rewrite``; called lazily for training data.

        Only the input side is rewritten (never a label or a completion). Not implemented here:
        datamodules without it reject ``augment``.
        """
        raise NotImplementedError

    def prepare_split(self, split: Split, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Last transformation of a tokenized split (packing, for instance); identity by default."""
        return examples

    def assemble_splits(self, tokenized: dict[Split, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        """The served splits from the tokenized ones (only the splits with a source are keys).

        Without a validation source, ``val_fraction`` of the training examples is held out with
        ``seed``; the training split then goes through `prepare_split`.
        """
        train = tokenized.get("train")
        if train is None:
            raise ConfigurationError(
                "`train_file` or `dataset` is required: the training split has no source, got None."
            )
        val = tokenized.get("val")
        if val is None and self.val_fraction > 0:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, round(len(train) * self.val_fraction))
            if n_val >= len(train):
                raise DataError(
                    f"the training split has {len(train)} example(s): too few to hold out a validation split."
                )
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        splits = {"train": self.prepare_split("train", train)}
        if val is not None:
            splits["val"] = val
        if "test" in tokenized:
            splits["test"] = tokenized["test"]
        return splits

    # ----------------------------------------------------------------- checks and Lightning hooks
    def validate_inputs(self) -> None:
        """Read, parse and tokenize every configured split (train, val and test) and write nothing.

        Raises the errors `setup` would (a missing or unreadable file, a bad line or row, a missing
        column, an example longer than ``max_length``, a split too small to hold out validation)
        without creating ``cache_dir`` or any file; call it before anything else writes (loggers,
        checkpoints) so that a data error leaves no trace. A cache file that already exists is
        read instead of tokenizing. The result is kept: `setup` then only writes the cache files.
        A ``datasets.load_dataset`` spec is loaded by ``datasets``, which keeps its own cache.

        Example::

            dm = InstructionDataModule("gpt2", train_file="train.jsonl", val_file="val.jsonl", cache_dir="cache")
            dm.validate_inputs()   # DataError("val.jsonl line 12: ...") before anything is written
        """
        if self.datasets:
            return
        tokenized = {split: result for split in SPLITS if (result := self._tokenize_split(split)) is not None}
        datasets = self.assemble_splits({split: result.examples for split, result in tokenized.items()})
        if self.augment is not None:
            self._augmented_copy(datasets["train"][0], epoch=0, copy=1)  # a bad record or synonym source fails here
        self._unwritten = [result for result in tokenized.values() if result.cache_path and not result.from_cache]
        self.datasets = datasets

    def setup(self, stage: str | None = None) -> None:
        """Check and tokenize every split (`validate_inputs`), then write the cache files of ``cache_dir``."""
        self.validate_inputs()
        for result in self._unwritten:
            assert result.cache_path is not None
            os.makedirs(os.path.dirname(result.cache_path), exist_ok=True)
            tmp = f"{result.cache_path}.tmp{os.getpid()}"
            torch.save(result.examples, tmp)
            os.replace(tmp, result.cache_path)  # atomic: a cache file is whole or absent
        self._unwritten = []

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
                f"no {split} data: set `{split}_file` or give `dataset` a {split} split"
                + (", or `val_fraction` > 0." if split == "val" else ".")
            )
        augment = self.augment if split == "train" else None
        examples = self.datasets[split]
        return build_loader(
            AugmentedSplit(examples, augment.num_aug, self._augmented_copy) if augment else examples,  # type: ignore[arg-type]
            batch_size=batch_size,
            collate_fn=self.collate_fn(split),
            trainer=self.trainer,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            tag_epoch=augment is not None,
        )

    def _augmented_copy(self, example: dict[str, Any], epoch: int, copy: int) -> dict[str, Any]:
        """Augmented copy ``copy`` (>= 1) of a training example in ``epoch``, tokenized; seeded by (seed, epoch, record, copy)."""
        assert self.augment is not None
        augment, source = self.augment, example["source"]
        where, record = self._train_records[source]
        fields = itertools.count()  # every rewritten field of a record draws its own stream

        def rewrite(text: str) -> str:
            return augment(text, seed=f"{self.seed}/{epoch}/{source}/{copy}/{next(fields)}")

        encoded = self.encode(self.augment_record(record, rewrite), f"{where} (augmented copy {copy})")
        if self.max_length is not None and len(encoded["input_ids"]) > self.max_length and self.overflow != "truncate":
            return example
        fitted = self._fit_length(encoded, where)
        return example if fitted is None else {**fitted, "source": source}

    def _source(self, split: Split) -> str | tuple[str, Any] | None:
        """A file path, a ``(split name, Dataset)`` pair, or None."""
        if self.dataset is not None:
            if self._dataset_sources is None:
                self._dataset_sources = select_splits(load_dataset_argument(self.dataset), self.dataset_splits)
            return self._dataset_sources.get(split)
        source = self.files[split]
        if source is None or isinstance(source, (str, os.PathLike)):
            return os.fspath(source) if source is not None else None
        return (str(source.split) if source.split is not None else split), source

    def _tokenize_split(self, split: Split) -> _Tokenized | None:
        records = self.load_records(split)
        if records is None:
            return None
        if split == "train" and self.augment is not None:
            self._train_records = records  # rewritten per epoch; examples keep their record's index as "source"
        cache_path = self._cache_path(split, records)
        if cache_path is not None and os.path.isfile(cache_path):
            return _Tokenized(torch.load(cache_path, weights_only=True), cache_path, from_cache=True)
        examples, dropped = [], 0
        for source, (where, record) in enumerate(records):
            example = self._fit_length(self.encode(record, where), where)
            if example is None:
                dropped += 1
            else:
                examples.append({**example, "source": source} if self.augment is not None else example)
        if dropped:
            rank_zero_warn(f"{split} split: dropped {dropped} example(s) longer than max_length={self.max_length}.")
        if not examples:
            raise DataError(f"the {split} split holds no usable examples (empty dataset).")
        return _Tokenized(examples, cache_path, from_cache=False)

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
        if "labels" in cut and all(label == IGNORE_INDEX for label in cut["labels"]):
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
        settings: dict[str, Any] = {"max_length": self.max_length, "overflow": self.overflow}
        if self.augment is not None:
            settings["sources"] = True  # the examples carry their record's index
        return settings
