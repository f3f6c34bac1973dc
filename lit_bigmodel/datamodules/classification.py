"""`TextClassificationDataModule`: text → label from CSV or JSONL, for sequence classification."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_bigmodel.augmentation import EDA
from lit_bigmodel.datamodules._base import DataSource, Overflow, Split, TokenizedDataModule
from lit_bigmodel.datamodules._collate import ClassificationCollator
from lit_bigmodel.datamodules._records import Record, require_keys
from lit_bigmodel.errors import ConfigurationError, DataError


class TextClassificationDataModule(TokenizedDataModule):
    """Text classification data (``text``, ``label``) from ``.csv``/``.tsv`` or ``.jsonl`` files, or a Hugging Face dataset.

    Labels are integers in ``[0, num_labels)``, or strings listed in ``label_names`` (mapped to
    their index). Without ``num_labels`` and ``label_names``, ``num_labels`` is inferred as the
    largest training label + 1. Longer texts follow ``overflow`` (``"truncate"`` keeps the first
    ``max_length`` tokens).

    Args:
        train_file, val_file, test_file: CSV / TSV / JSONL files, or ``datasets.Dataset`` objects
            (in Python); without a validation source, ``val_fraction`` of the training split is
            held out with ``seed``.
        dataset: instead of files, a Hugging Face dataset: a ``DatasetDict`` (or ``Dataset``, the
            training split), a dict of ``datasets.load_dataset`` arguments such as
            ``{"path": "csv", "data_files": {"train": "train.csv", "test": "test.csv"}}``, or the
            path of a folder saved with ``save_to_disk``. Needs ``pip install datasets``.
        dataset_splits: which of the dataset's splits are ``train`` / ``val`` / ``test``; by
            default ``train``, the first of ``validation``/``valid``/``val``/``dev``, and ``test``,
            each used when present.
        text_field, label_field: column / key names.
        num_labels: the number of classes; a label outside ``[0, num_labels)`` is an error naming
            its line (or dataset row).
        label_names: class names, for string labels.
        augment: an `EDA` that rewrites ``text_field`` of the training examples, anew every epoch:
            each epoch holds every training example once as it is and ``augment.num_aug`` times
            augmented (labels unchanged); validation and test data are not augmented.

    Raises:
        MissingPathError: a file does not exist or is a directory.
        DataError: a file cannot be read or parsed, a record lacks ``text_field`` / ``label_field``
            or has a bad label (the message names the file and line, or the dataset split and
            row), a dataset lacks the columns.

    Example::

        dm = TextClassificationDataModule("bert-base-uncased", train_file="reviews.csv", num_labels=2)
        Trainer(max_epochs=3).fit(SFTModule("bert-base-uncased", task="sequence_classification", num_labels=2), dm)
        dm = TextClassificationDataModule("bert-base-uncased", dataset=load_from_disk("imdb"), num_labels=2)
        dm = TextClassificationDataModule("bert-base-uncased", train_file="reviews.csv", augment=EDA(num_aug=16))
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        train_file: DataSource = None,
        val_file: DataSource = None,
        test_file: DataSource = None,
        num_labels: int | None = None,
        label_names: Sequence[str] | None = None,
        text_field: str = "text",
        label_field: str = "label",
        val_fraction: float = 0.1,
        max_length: int | None = None,
        overflow: Overflow = "truncate",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        dataset: Any = None,
        dataset_splits: Mapping[str, str] | None = None,
        augment: EDA | None = None,
    ) -> None:
        super().__init__(
            tokenizer, train_file, val_file, test_file, val_fraction, max_length, overflow,
            batch_size, eval_batch_size, num_workers, seed, cache_dir, dataset, dataset_splits, augment,
        )  # fmt: skip
        if label_names is not None:
            label_names = list(label_names)
            if num_labels is not None and num_labels != len(label_names):
                raise ConfigurationError(
                    f"`num_labels` ({num_labels}) must equal the length of `label_names` ({len(label_names)})."
                )
            num_labels = len(label_names)
        if num_labels is not None and num_labels < 2:
            raise ConfigurationError(f"`num_labels` must be >= 2, got {num_labels!r}.")
        if self.tokenizer.pad_token_id is None:
            raise ConfigurationError("the tokenizer has no pad token; set `tokenizer.pad_token`.")
        self.num_labels = num_labels
        self.label_names = label_names
        self.text_field = text_field
        self.label_field = label_field

    def assemble_splits(self, tokenized: dict[Split, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        splits = super().assemble_splits(tokenized)
        if self.num_labels is None:
            self.num_labels = max(2, 1 + max(example["label"] for example in splits["train"]))
        return splits

    def required_columns(self) -> Sequence[tuple[str, ...]]:
        return ((self.text_field, self.label_field),)

    def columns_hint(self) -> str:
        return f"each row needs {self.text_field!r} and {self.label_field!r} (set `text_field` / `label_field`)."

    def encode(self, record: Record, where: str) -> dict[str, Any]:
        require_keys(record, (self.text_field, self.label_field), where, self.columns_hint())
        text = record[self.text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: {self.text_field!r} must be a string, got {type(text).__name__}.")
        encoded = self.tokenizer(text, add_special_tokens=True)
        example = {"input_ids": encoded["input_ids"], "label": self._label(record[self.label_field], where)}
        if "token_type_ids" in encoded:
            example["token_type_ids"] = encoded["token_type_ids"]
        return example

    def augment_record(self, record: Record, rewrite: Callable[[str], str]) -> Record:
        return {**record, self.text_field: rewrite(record[self.text_field])}

    def _label(self, value: Any, where: str) -> int:
        if self.label_names is not None and isinstance(value, str) and value in self.label_names:
            return self.label_names.index(value)
        try:
            label = int(value)
        except (TypeError, ValueError):
            allowed = f"one of {self.label_names}" if self.label_names else "an integer"
            raise DataError(f"{where}: label {value!r} is not {allowed}.") from None
        if label < 0 or (self.num_labels is not None and label >= self.num_labels):
            raise DataError(f"{where}: label {label} is outside [0, num_labels={self.num_labels}).")
        return label

    def collate_fn(self, split: Split) -> Callable[[list[Any]], Any]:
        return ClassificationCollator(pad_token_id=self.tokenizer.pad_token_id)

    def _cache_settings(self) -> dict[str, Any]:
        return {
            **super()._cache_settings(),
            "fields": [self.text_field, self.label_field],
            "labels": [self.num_labels, self.label_names],
        }
