"""The one place that touches private Lightning names: where Lightning has no public API for what we need.

Every private function the package calls is imported here and re-exported under a public-looking name;
every private method our CPU strategies override is listed in `OVERRIDDEN`. `check_internals` (run by
``tests/test_internals.py``) fails loudly, naming the name, when a Lightning release moves or reshapes
one of them, instead of a strategy failing obscurely in a 2-process run.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing as setup_activation_checkpointing
from lightning.fabric.utilities.load import _load_distributed_checkpoint as load_distributed_checkpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device as move_torchmetrics_to_device

__all__ = [
    "OVERRIDDEN",
    "check_internals",
    "load_distributed_checkpoint",
    "move_torchmetrics_to_device",
    "setup_activation_checkpointing",
]

# Private methods that `CPUFSDPStrategy` / `CPUDeepSpeedStrategy` override or call, with their parameters.
OVERRIDDEN: dict[type, dict[str, tuple[str, ...]]] = {
    FSDPStrategy: {"_setup_model": ("self", "model")},
    DeepSpeedStrategy: {
        "_get_process_group_backend": ("self",),
        "_init_deepspeed_distributed": ("self",),
        "_initialize_deepspeed_train": ("self", "model"),
        "_initialize_deepspeed_inference": ("self", "model"),
    },
}
# Private functions called, with their parameters.
CALLED: dict[str, tuple[Any, tuple[str, ...]]] = {
    "lightning.fabric.strategies.fsdp._setup_activation_checkpointing": (
        setup_activation_checkpointing,
        ("module", "activation_checkpointing_kwargs"),
    ),
    "lightning.pytorch.strategies.fsdp._move_torchmetrics_to_device": (
        move_torchmetrics_to_device,
        ("module", "device"),
    ),
    "lightning.fabric.utilities.load._load_distributed_checkpoint": (
        load_distributed_checkpoint,
        ("checkpoint_folder",),
    ),
}
# Private attributes read on strategy instances.
ATTRIBUTES: dict[type, tuple[str, ...]] = {
    FSDPStrategy: ("_activation_checkpointing_kwargs",),
    DeepSpeedStrategy: ("_process_group_backend",),
}


def check_internals() -> list[str]:
    """Every way the installed Lightning differs from what this package relies on (empty: none)."""
    problems = []
    for owner, methods in OVERRIDDEN.items():
        for name, params in methods.items():
            method = getattr(owner, name, None)
            if method is None:
                problems.append(f"{owner.__name__}.{name} no longer exists")
            elif tuple(inspect.signature(method).parameters) != params:
                problems.append(f"{owner.__name__}.{name}{inspect.signature(method)} no longer takes {params}")
    for where, (function, params) in CALLED.items():
        if tuple(inspect.signature(function).parameters) != params:
            problems.append(f"{where}{inspect.signature(function)} no longer takes {params}")
    return problems
