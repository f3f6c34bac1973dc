"""The README's API section names what the package exports, and every name it lists imports."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_table() -> dict[str, list[str]]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, list[str]] = {}
    for line in section.splitlines():
        row = re.match(r"\| `(lit_bigmodel[\w.]*)` \| (.*) \|$", line)
        if row:
            table[row.group(1)] = re.findall(r"`(\w+)`", row.group(2))
    return table


def test_every_name_in_the_readme_api_section_imports():
    table = _api_table()
    assert len(table) >= 10
    missing = [
        f"{module}.{name}"
        for module, names in table.items()
        for name in names
        if not hasattr(importlib.import_module(module), name)
    ]
    assert missing == []


def test_every_exported_name_is_in_the_readme_api_section():
    table = _api_table()
    for module in ("lit_bigmodel", "lit_bigmodel.callbacks", "lit_bigmodel.datamodules", "lit_bigmodel.nets"):
        exported = set(importlib.import_module(module).__all__)
        listed = set(table[module]) | (set(table["lit_bigmodel.losses"]) | set(table["lit_bigmodel.errors"]))
        assert exported - listed == set(), module
