"""The settings of a `lit-bigmodel tune` study (search file plus overrides), checked before the first trial.

A search file::

    monitor: val/loss          # a metric the module logs
    direction: minimize        # or maximize
    n_trials: 8                # and / or timeout (seconds)
    sampler: tpe               # grid, random, tpe, gp, cmaes, nsga2; or {name: tpe, <sampler arguments>}
    pruner: median             # median, asha, hyperband, none; or {name: median, n_startup_trials: 2}
    seed: 0
    params:
      model.init_args.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    enqueue:                   # optional: trials to run first
      - {model.init_args.learning_rate: 2.0e-3}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from lit_bigmodel._checks import check_number
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.tuning.space import Param, parse_params

SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "grid": optuna.samplers.GridSampler,
    "random": optuna.samplers.RandomSampler,
    "tpe": optuna.samplers.TPESampler,
    "gp": optuna.samplers.GPSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "asha": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
DIRECTIONS = ("minimize", "maximize")
_KEYS = ("monitor", "direction", "n_trials", "timeout", "sampler", "pruner", "seed", "params", "enqueue")
_OWN_ARGS = {"seed", "search_space"}  # set by `make_sampler`, not by the search file


@dataclass
class TuneSettings:
    """What a study searches and how.

    Args:
        params: the searched keys of the CLI config.
        monitor: the logged metric to optimize.
        direction: ``minimize`` or ``maximize``.
        n_trials: finished (complete or pruned) trials to reach; None: until ``timeout``.
        timeout: seconds after which a worker starts no new trial; None: no limit.
        sampler: one of `SAMPLERS`; ``sampler_args`` go to its constructor.
        pruner: one of `PRUNERS`; ``pruner_args`` go to its constructor.
        seed: seeds the sampler; None draws one.
        enqueue: trials to run first, each a mapping of searched key to value.

    Example::

        settings = parse_settings(yaml.safe_load(open("configs/tune_sft_tiny.yaml")), has_key=lambda key: True)
    """

    params: list[Param]
    monitor: str
    direction: str = "minimize"
    n_trials: int | None = None
    timeout: float | None = None
    sampler: str = "tpe"
    sampler_args: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    pruner_args: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    enqueue: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able description of what is searched (stored with the study to detect a changed search file)."""
        return {
            "monitor": self.monitor,
            "direction": self.direction,
            "params": {p.key: [p.type, p.low, p.high, p.log, p.step, list(p.choices)] for p in self.params},
        }

    def make_sampler(self, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
        """The sampler, seeded from ``seed`` and the number of trials the study has so far.

        A worker makes a new sampler before each trial, so a rerun or a second worker does not replay
        the random draws of the first, and one worker's study is the same for the same ``seed``. The
        grid sampler keeps one seed for the whole study: it shuffles the grid with its seed and records
        each trial's point as a position in that order, so another order per trial would repeat points.
        """
        if self.sampler == "grid":
            grid = {p.key: p.grid_values() for p in self.params}
            return _GridSampler(grid, seed=self._trial_seed(0), **self.sampler_args)
        seed = self._trial_seed(trials_so_far)
        return SAMPLERS[self.sampler](seed=seed, **self.sampler_args)

    def _trial_seed(self, trials_so_far: int) -> int | None:
        return None if self.seed is None else (self.seed * 1_000_003 + trials_so_far) % 2**32

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return PRUNERS[self.pruner](**self.pruner_args)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` (the tune loop counts trials itself)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def parse_settings(
    search: Mapping[str, Any], *, has_key: Callable[[str], bool] | None = None, **overrides: Any
) -> TuneSettings:
    """The `TuneSettings` of a search mapping; ``overrides`` that are not None replace its entries.

    Raises one `ConfigurationError` that lists every problem.

    Example::

        parse_settings({"monitor": "val/loss", "n_trials": 4, "params": {...}}, sampler="random", seed=0)
    """
    if not isinstance(search, Mapping):
        raise ConfigurationError(f"the search file must be a mapping with `params` and `monitor`, got {search!r}.")
    merged = {**search, **{k: v for k, v in overrides.items() if v is not None}}
    problems: list[str] = []
    unknown = sorted(set(merged) - set(_KEYS))
    if unknown:
        problems.append(f"unknown search-file key(s) {', '.join(unknown)} (allowed: {', '.join(_KEYS)}).")
    params: list[Param] = []
    try:
        params = parse_params(merged.get("params"), has_key=has_key)
    except ConfigurationError as err:
        problems.append(str(err))
    monitor = merged.get("monitor")
    if not isinstance(monitor, str) or not monitor:
        problems.append(f"`monitor` must name a logged metric such as 'val/loss', got {monitor!r}.")
    direction = merged.get("direction", "minimize")
    if direction not in DIRECTIONS:
        problems.append(f"`direction` must be one of {', '.join(DIRECTIONS)}, got {direction!r}.")
    n_trials, timeout, seed = merged.get("n_trials"), merged.get("timeout"), merged.get("seed")
    for name, value, low, integer in (("n_trials", n_trials, 1, True), ("timeout", timeout, 0, False)):
        problem = value is not None and check_number(name, value, low=low, low_open=not integer, integer=integer)
        if problem:
            problems.append(problem)
    if seed is not None and (problem := check_number("seed", seed, low=0, integer=True)):
        problems.append(problem)
    sampler, sampler_args = _named(merged.get("sampler", "tpe"), "sampler", SAMPLERS, problems)
    pruner, pruner_args = _named(merged.get("pruner", "median"), "pruner", PRUNERS, problems)
    enqueue = _parse_enqueue(merged.get("enqueue"), params, problems)
    if problems:
        raise ConfigurationError(" ".join(problems))
    assert isinstance(monitor, str)
    settings = TuneSettings(
        params, monitor, direction, n_trials, None if timeout is None else float(timeout),
        sampler, sampler_args, pruner, pruner_args, seed, enqueue,
    )  # fmt: skip
    _check_combination(settings)
    return settings


def _named(value: Any, what: str, known: Mapping[str, Callable[..., Any]], problems: list[str]) -> tuple[str, dict]:
    """``tpe`` or ``{name: tpe, **arguments}`` as (name, arguments); unknown names or arguments are problems."""
    args: dict[str, Any] = {}
    if isinstance(value, Mapping):
        args = {k: v for k, v in value.items() if k != "name"}
        value = value.get("name")
    if value not in known:
        problems.append(f"`{what}` must be one of {', '.join(known)}, got {value!r}.")
        return "", {}
    accepted = set(inspect.signature(known[value]).parameters) - _OWN_ARGS
    bad = sorted(set(args) - accepted)
    if bad:
        allowed = ", ".join(sorted(accepted)) or "none"
        problems.append(f"`{what}` {value!r} takes no argument(s) {', '.join(bad)} (allowed: {allowed}).")
    return str(value), args


def _parse_enqueue(value: Any, params: list[Param], problems: list[str]) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        problems.append(f"`enqueue` must be a list of mappings from searched key to value, got {value!r}.")
        return []
    by_key = {p.key: p for p in params}
    for item in value:
        extra = sorted(set(item) - set(by_key))
        if params and extra:
            problems.append(f"`enqueue` names key(s) that are not searched: {', '.join(extra)}.")
        for key, given in item.items():
            if key in by_key and not by_key[key].contains(given):
                param = by_key[key]
                allowed = list(param.choices) if param.type == "categorical" else f"[{param.low}, {param.high}]"
                problems.append(f"`enqueue` value {given!r} of {key} is outside its search space {allowed}.")
    return [dict(item) for item in value]


def _check_combination(settings: TuneSettings) -> None:
    problems: list[str] = []
    if settings.sampler == "grid":
        size = 1
        for param in settings.params:
            try:
                size *= len(param.grid_values())
            except ConfigurationError as err:
                problems.append(str(err))
        if not problems and settings.n_trials is None:
            settings.n_trials = size
        if not problems and settings.n_trials is not None and settings.n_trials > size:
            problems.append(f"`n_trials` {settings.n_trials} is more than the {size} points of the grid.")
    if settings.n_trials is None and settings.timeout is None:
        problems.append("set `n_trials` or `timeout` (or both); got neither.")
    if problems:
        raise ConfigurationError(" ".join(problems))
