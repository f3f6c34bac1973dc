"""Read JSONL / CSV records with their line numbers, so errors can point at the line."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from lit_bigmodel.errors import DataError, MissingPathError

Record = dict[str, Any]


def read_records(path: str | os.PathLike[str]) -> list[tuple[int, Record]]:
    """Return ``(line_number, record)`` pairs from a ``.jsonl``/``.json`` or ``.csv``/``.tsv`` file.

    Raises:
        MissingPathError: the file does not exist.
        DataError: a line is not a JSON object, or the file holds no records.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingPathError(f"data file {path!r} does not exist.")
    suffix = os.path.splitext(path)[1].lower()
    records: list[tuple[int, Record]] = []
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                records.append((reader.line_num, dict(row)))
        else:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {line_number}: not valid JSON ({err.msg}).") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {line_number}: expected a JSON object, got {type(record).__name__}.")
                records.append((line_number, record))
    if not records:
        raise DataError(f"{path} holds no examples (empty dataset).")
    return records


def require_keys(record: Record, keys: tuple[str, ...], where: str, hint: str) -> None:
    """Raise a `DataError` naming ``where`` if ``record`` lacks any of ``keys``."""
    missing = [key for key in keys if key not in record or record[key] is None]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; {hint}")
