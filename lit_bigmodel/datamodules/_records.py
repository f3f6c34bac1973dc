"""Where records come from: JSONL / CSV files (errors name the line) or Hugging Face datasets (errors name the row).

Every failure to read a source (a missing path, a directory, an unreadable file, a byte that is not
UTF-8, malformed JSON or CSV, a dataset that does not load or lacks a column) is one `DataError` or
`MissingPathError` naming the argument, the file and, where known, the line or row.
``datasets`` is optional: it is imported only when a dataset is given.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lit_bigmodel.errors import ConfigurationError, DataError, MissingPathError

Record = dict[str, Any]
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")
_INSTALL = "pip install datasets"


# ----------------------------------------------------------------- files
def check_data_file(path: str | os.PathLike[str], argument: str, needed: str | None = None) -> str:
    """Return ``path`` as a string if it is an existing file; raise `MissingPathError` naming ``argument`` if not.

    ``needed`` says what the argument takes, for the message about a directory; by default a data
    file, with a pointer to ``dataset`` for a folder saved with ``save_to_disk``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if needed is not None:
            raise MissingPathError(f"{argument} {path!r} is a directory: {needed} is needed.")
        raise MissingPathError(
            f"{argument} {path!r} is a directory: a data file ({', '.join(DATA_SUFFIXES)}) is needed. "
            "A folder saved with `Dataset.save_to_disk` goes in `dataset`."
        )
    if not os.path.isfile(path):
        raise MissingPathError(f"{argument} {path!r} does not exist.")
    return path


def read_bytes(path: str, argument: str) -> bytes:
    """The bytes of ``path``; any I/O error becomes a `DataError` naming ``argument`` and the file."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise MissingPathError(f"{argument} {path!r} does not exist.") from None
    except OSError as err:
        raise DataError(f"{argument} {path!r} cannot be read: {err.strerror or err}.") from None


def decode_utf8(data: bytes, path: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped); a bad byte is a `DataError` naming its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); save the file as UTF-8."
        ) from None


def read_records(path: str | os.PathLike[str], argument: str = "data file") -> list[tuple[int, Record]]:
    """Return ``(line_number, record)`` pairs from a ``.jsonl``/``.json`` or ``.csv``/``.tsv`` file.

    CSV fields of any length are read (the ``csv`` module's field size limit is raised for the call).

    Raises:
        MissingPathError: the path does not exist or is a directory.
        DataError: the file cannot be read, is not UTF-8, a line is not a JSON object or a CSV row
            has more fields than the header (the message names the file and the line), or the
            file holds no records.

    Example::

        for line, record in read_records("train.jsonl", "`train_file`"):
            print(line, record["prompt"])
    """
    path = check_data_file(path, argument)
    text = decode_utf8(read_bytes(path, argument), path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".csv", ".tsv"):
        records = _csv_records(text, path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        records = _jsonl_records(text, path)
    if not records:
        raise DataError(f"{path} holds no examples (empty dataset).")
    return records


def _jsonl_records(text: str, path: str) -> list[tuple[int, Record]]:
    records: list[tuple[int, Record]] = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line_number}: not valid JSON ({err.msg}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {line_number}: expected a JSON object, got {type(record).__name__}.")
        records.append((line_number, record))
    return records


def _csv_records(text: str, path: str, delimiter: str) -> list[tuple[int, Record]]:
    records: list[tuple[int, Record]] = []
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # no field is longer than the file
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            for row in reader:
                if None in row:  # DictReader files the fields beyond the header under the key None
                    header = len(reader.fieldnames or ())
                    raise DataError(
                        f"{path} line {reader.line_num}: {header + len(row[None])} fields, "  # type: ignore[index]
                        f"but the header names {header}."
                    )
                records.append((reader.line_num, dict(row)))
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: not valid CSV ({err}).") from None
    finally:
        csv.field_size_limit(limit)
    return records


def require_keys(record: Record, keys: tuple[str, ...], where: str, hint: str) -> None:
    """Raise a `DataError` naming ``where`` if ``record`` lacks any of ``keys``."""
    missing = [key for key in keys if key not in record or record[key] is None]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; {hint}")


# ----------------------------------------------------------------- Hugging Face datasets
def is_hf_dataset(value: Any) -> bool:
    """Whether ``value`` is a ``datasets.Dataset`` (checked without importing ``datasets``)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(value, module.Dataset)


def is_hf_dataset_dict(value: Any) -> bool:
    """Whether ``value`` is a ``datasets.DatasetDict`` (checked without importing ``datasets``)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(value, module.DatasetDict)


def check_dataset_argument(dataset: Any) -> str | None:
    """The problem with a ``dataset`` argument, or None if it is usable (nothing is loaded)."""
    if dataset is None or is_hf_dataset(dataset) or is_hf_dataset_dict(dataset):
        return None
    if not isinstance(dataset, (str, os.PathLike, Mapping)):
        return (
            "`dataset` must be a `datasets.Dataset` / `DatasetDict`, a dict of `datasets.load_dataset` arguments "
            f"or the path of a folder saved with `save_to_disk`, got {type(dataset).__name__}."
        )
    if importlib.util.find_spec("datasets") is None:
        return f"`dataset` {dataset!r} needs the Hugging Face `datasets` package: {_INSTALL}."
    if isinstance(dataset, Mapping) and "path" not in dataset:
        return (
            f"`dataset` {dict(dataset)!r} must name `path`, the first argument of `datasets.load_dataset` "
            "(e.g. {'path': 'json', 'data_files': {'train': 'train.jsonl'}})."
        )
    return None


def load_dataset_argument(dataset: Any) -> Any:
    """Load a ``dataset`` argument: a ``Dataset``/``DatasetDict`` as it is, a spec dict through
    ``datasets.load_dataset(**spec)``, a path through ``datasets.load_from_disk``.

    Raises:
        ConfigurationError: ``datasets`` is not installed.
        MissingPathError: a path or data file does not exist.
        DataError: the dataset does not load (the message carries the loader's reason).
    """
    if is_hf_dataset(dataset) or is_hf_dataset_dict(dataset):
        return dataset
    try:
        import datasets
    except ImportError:
        raise ConfigurationError(
            f"`dataset` {dataset!r} needs the Hugging Face `datasets` package: {_INSTALL}."
        ) from None
    if isinstance(dataset, Mapping):
        spec = dict(dataset)
        try:
            loaded = datasets.load_dataset(**spec)
        except FileNotFoundError as err:
            raise MissingPathError(f"`dataset` {spec!r}: {err}") from None
        except Exception as err:  # the loaders raise many types; the user needs the reason, not the type
            reason = f"{err}" + (f" ({err.__cause__})" if err.__cause__ is not None else "")
            raise DataError(f"`dataset` {spec!r} does not load: {reason}") from None
        if isinstance(loaded, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            raise ConfigurationError(f"`dataset` {spec!r} loads a streaming dataset; remove `streaming`.")
        return loaded
    path = os.fspath(dataset)
    if not os.path.isdir(path):
        raise MissingPathError(
            f"`dataset` {path!r} is not a folder saved with `save_to_disk`"
            + (" (it does not exist)." if not os.path.exists(path) else ".")
            + " A data file goes in `train_file`; other sources in a `datasets.load_dataset` dict such as "
            "{'path': 'json', 'data_files': 'train.jsonl'}."
        )
    try:
        return datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise MissingPathError(f"`dataset` {path!r}: {err}") from None
    except Exception as err:
        raise DataError(f"`dataset` {path!r} does not load: {err}") from None


def select_splits(loaded: Any, names: Mapping[str, str] | None) -> dict[str, tuple[str, Any]]:
    """Map ``train`` / ``val`` / ``test`` to ``(split name, Dataset)`` of a loaded dataset.

    A single ``Dataset`` is the training split. In a ``DatasetDict`` the defaults are ``train``,
    the first of ``validation``/``valid``/``val``/``dev`` and ``test``, each used when present;
    a split named in ``names`` must exist.
    """
    if is_hf_dataset(loaded):
        name = str(loaded.split) if loaded.split is not None else "train"
        if names and set(names) - {"train"}:
            raise ConfigurationError(
                f"`dataset_splits` {dict(names)!r} names val/test splits, but `dataset` is one Dataset; "
                "pass a DatasetDict."
            )
        return {"train": (name, loaded)}
    available = list(loaded.keys())
    chosen: dict[str, tuple[str, Any]] = {}
    for split in ("train", "val", "test"):
        if names is not None and split in names:
            name = names[split]
            if name not in available:
                raise ConfigurationError(
                    f"`dataset_splits` maps {split!r} to {name!r}, but the dataset's splits are {available}."
                )
        else:
            defaults = {"train": ("train",), "val": _VAL_SPLIT_NAMES, "test": ("test",)}[split]
            found = [candidate for candidate in defaults if candidate in available]
            if not found:
                continue
            name = found[0]
        chosen[split] = (name, loaded[name])
    if "train" not in chosen:
        raise ConfigurationError(
            f"the dataset has no 'train' split (its splits: {available}); "
            "name it with `dataset_splits`, e.g. {'train': '" + (available[0] if available else "train") + "'}."
        )
    return chosen


def check_columns(dataset: Any, alternatives: Sequence[tuple[str, ...]], name: str, hint: str) -> None:
    """Raise a `DataError` unless ``dataset`` has every column of at least one of ``alternatives``."""
    if not alternatives:
        return
    columns = list(dataset.column_names)
    missing = [[column for column in needed if column not in columns] for needed in alternatives]
    if any(not m for m in missing):
        return
    closest = min(missing, key=len)
    raise DataError(f"dataset split {name!r} has no column(s) {closest} (its columns: {columns}); {hint}")


def dataset_records(dataset: Any, name: str) -> list[tuple[str, Record]]:
    """``(where, record)`` pairs of a ``datasets.Dataset``, as plain Python values; ``where`` names the row."""
    if len(dataset) == 0:
        raise DataError(f"dataset split {name!r} holds no examples (empty dataset).")
    return [(f"dataset split {name!r} row {i}", row) for i, row in enumerate(dataset.with_format(None))]
