"""The private Lightning names the package relies on still exist with the same parameters (see _internals.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lit_bigmodel._internals import ATTRIBUTES, OVERRIDDEN, check_internals
from lit_bigmodel.strategies import CPUDeepSpeedStrategy, CPUFSDPStrategy

PACKAGE = Path(__file__).resolve().parents[1] / "lit_bigmodel"


def test_installed_lightning_has_every_private_name_we_use():
    assert check_internals() == []


@pytest.mark.parametrize("owner", [FSDPStrategy, DeepSpeedStrategy])
def test_private_attributes_read_on_strategies_exist(owner):
    pytest.importorskip("deepspeed") if owner is DeepSpeedStrategy else None
    strategy = owner()
    for name in ATTRIBUTES[owner]:
        assert hasattr(strategy, name), f"{owner.__name__} instances no longer have {name}"


def test_cpu_strategies_override_only_listed_private_methods():
    for cls, base in ((CPUFSDPStrategy, FSDPStrategy), (CPUDeepSpeedStrategy, DeepSpeedStrategy)):
        overridden = {n for n, v in vars(cls).items() if n.startswith("_") and not n.startswith("__") and callable(v)}
        ours = {"_local_device_rank"}  # defined by us, not Lightning
        assert overridden - ours <= set(OVERRIDDEN[base]), overridden - ours - set(OVERRIDDEN[base])


def test_no_module_but_the_adapter_imports_a_private_lightning_name():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
                offenders += [f"{path.name}: {alias.name}" for alias in node.names if alias.name.startswith("_")]
    assert offenders == []
