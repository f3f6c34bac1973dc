"""Quiet imports of optional backends: their import-time log lines are not the user's business.

``import peft`` imports torchao and bitsandbytes when they are installed, and those log, at import,
that kernels for other hardware (CUDA fp8, a hub kernel for CPU 4-bit) could not be loaded, and torch
logs a deprecation of theirs. Those lines would precede every message of ours, the one-line errors of
the CLI included. `quiet_imports` raises the level of exactly those loggers for the length of an import.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# the loggers of optional backends that log at import time
BACKEND_LOGGERS = ("torchao", "bitsandbytes", "kernels", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports(names: tuple[str, ...] = BACKEND_LOGGERS) -> Iterator[None]:
    """Within the block, the loggers ``names`` (and their children) log errors only; their levels are restored after.

    Example::

        with quiet_imports():
            import peft
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
