"""The search space of `lit-bigmodel tune`: one `Param` per key of the CLI config, parsed and checked.

A search space maps a dotted key of the CLI config (``model.init_args.learning_rate``) to a spec:
``{type: float, low, high, log, step}``, ``{type: int, low, high, log, step}`` or
``{type: categorical, choices: [...]}``. `parse_params` collects every problem and raises once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from lit_bigmodel._checks import check_number
from lit_bigmodel.errors import ConfigurationError

TYPES = ("float", "int", "categorical")
_FIELDS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}
_CHOICE_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One searched key of the CLI config and the values it may take.

    Args:
        key: dotted key of the CLI config, e.g. ``model.init_args.learning_rate``.
        type: ``float``, ``int`` or ``categorical``.
        low: smallest value (``float`` / ``int``).
        high: largest value, inclusive (``float`` / ``int``).
        log: sample on a log scale (needs ``low > 0``).
        step: spacing of the values (``float`` / ``int``); a ``float`` range needs it for the ``grid`` sampler.
        choices: the values of a ``categorical`` parameter (None, bool, int, float or str).

    Example::

        Param("model.init_args.learning_rate", "float", low=1e-4, high=1e-2, log=True).suggest(trial)
    """

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """The value ``trial`` takes for this key (asked from the study's sampler)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.type == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (for enqueued trials)."""
        if self.type == "categorical":
            return any(type(value) is type(choice) and value == choice for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, int if self.type == "int" else (int, float)):
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def grid_values(self) -> list[Any]:
        """Every value of this parameter, for the ``grid`` sampler; a ``float`` range needs a ``step``."""
        if self.type == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "float" and self.step is None:
            raise ConfigurationError(
                f"params.{self.key}: the `grid` sampler needs a `step` for a float range "
                f"(got low={self.low!r}, high={self.high!r} and no step); add a step or use another sampler."
            )
        step = self.step if self.step is not None else 1
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        values = [self.low + i * step for i in range(count)]
        return [round(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]


def parse_params(params: Any, *, has_key: Callable[[str], bool] | None = None) -> list[Param]:
    """The `Param` list of a ``params`` mapping, or one `ConfigurationError` listing every problem.

    ``has_key`` answers whether the CLI config has a dotted key; keys it rejects are problems.

    Example::

        parse_params({"model.init_args.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    """
    if not isinstance(params, Mapping) or not params:
        raise ConfigurationError(f"`params` must be a non-empty mapping of config key to search spec, got {params!r}.")
    problems: list[str] = []
    parsed: list[Param] = []
    for key, spec in params.items():
        before = len(problems)
        param = _parse_one(str(key), spec, problems)
        if has_key is not None and not has_key(str(key)):
            problems.append(f"params.{key}: the CLI config has no key {key!r}.")
        if param is not None and len(problems) == before:
            parsed.append(param)
    if problems:
        raise ConfigurationError(" ".join(problems))
    return parsed


def _parse_one(key: str, spec: Any, problems: list[str]) -> Param | None:
    where = f"params.{key}"
    if not isinstance(spec, Mapping):
        problems.append(f"{where}: must be a mapping with a `type` ({', '.join(TYPES)}), got {spec!r}.")
        return None
    kind = spec.get("type")
    if kind not in TYPES:
        problems.append(f"{where}.type must be one of {', '.join(TYPES)}, got {kind!r}.")
        return None
    unknown = sorted(set(spec) - _FIELDS[kind] - {"type"})
    if unknown:
        allowed = ", ".join(sorted(_FIELDS[kind]))
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)} for type {kind} (allowed: {allowed}).")
    if kind == "categorical":
        return _parse_choices(key, spec.get("choices"), problems)
    integer = kind == "int"
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    count = len(problems)
    for name, value in (("low", low), ("high", high)):
        problem = check_number(f"{where}.{name}", value, integer=integer)
        if problem:
            problems.append(problem)
    if not isinstance(log, bool):
        problems.append(f"`{where}.log` must be true or false, got {log!r}.")
    if step is not None:
        problem = check_number(f"{where}.step", step, low=0, low_open=True, integer=integer)
        if problem:
            problems.append(problem)
    if len(problems) > count:
        return None
    assert isinstance(low, (int, float)) and isinstance(high, (int, float))
    if low > high:
        problems.append(f"{where}: low must be <= high, got low={low!r} > high={high!r}.")
    if log is True and low <= 0:
        problems.append(f"{where}: log=true needs low > 0, got low={low!r}.")
    if log is True and step is not None and not (integer and step == 1):
        problems.append(f"{where}: log=true and step={step!r} cannot be combined; drop one.")
    if len(problems) > count:
        return None
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _parse_choices(key: str, choices: Any, problems: list[str]) -> Param | None:
    where = f"params.{key}.choices"
    if not isinstance(choices, (list, tuple)) or not choices:
        problems.append(f"`{where}` must be a non-empty list, got {choices!r}.")
        return None
    bad = [c for c in choices if not isinstance(c, _CHOICE_TYPES) or (isinstance(c, float) and not math.isfinite(c))]
    if bad:
        problems.append(f"`{where}` may hold only null, bool, int, finite float or str values, got {bad!r}.")
        return None
    if len({repr(c) for c in choices}) < len(choices):
        problems.append(f"`{where}` has repeated values: {list(choices)!r}.")
        return None
    return Param(key, "categorical", choices=tuple(choices))
