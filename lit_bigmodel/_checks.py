"""Argument checks shared by the modules, callbacks and datamodules: one sentence per problem, naming the argument."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> str | None:
    """None if ``value`` is a finite number in the given range, else the sentence that says what is wrong.

    ``low`` / ``high`` are inclusive bounds unless ``low_open`` / ``high_open``; NaN and ±inf are never
    accepted; ``integer=True`` accepts only ``int`` (not ``bool``).

    Example::

        problems = [p for p in (check_number("learning_rate", lr, low=0, low_open=True),) if p]
    """
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        return f"`{name}` must be {kind}, got {value!r}."
    if not math.isfinite(value):
        return f"`{name}` must be {kind}, got {value!r}."
    if low is not None and (value <= low if low_open else value < low):
        return f"`{name}` must be {'>' if low_open else '>='} {low}, got {value!r}."
    if high is not None and (value >= high if high_open else value > high):
        return f"`{name}` must be {'<' if high_open else '<='} {high}, got {value!r}."
    return None


def check_patterns(value: str | Sequence[str] | None, argument: str, problems: list[str]) -> list[str]:
    """``value`` (one regular expression, several, or None) as a list; what does not compile goes to ``problems``.

    Example::

        problems: list[str] = []
        include = check_patterns(["attn", "mlp\\."], "include", problems)
    """
    patterns = [value] if isinstance(value, str) else list(value or [])
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            problems.append(f"`{argument}` must hold regular expressions, got {pattern!r} ({error}).")
    return patterns
