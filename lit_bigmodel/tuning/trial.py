"""One trial of `lit-bigmodel tune`: the CLI config with the trial's values, built and fitted in-process.

`BaseConfig` parses a `lit-bigmodel fit` config once (every key filled in, nothing instantiated);
`run_trial` builds the module, datamodule and trainer of one trial through `LitBigModelCLI` (so a trial
sees exactly what ``lit-bigmodel fit -c best.yaml`` sees) with the trial's own run folder and logger.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import Callback

from lit_bigmodel.cli import LitBigModelCLI, _check_config_files, _check_data, _model_problems, _parser_message
from lit_bigmodel.errors import ConfigurationError

_CLI_KWARGS: dict[str, Any] = {
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "save_config_kwargs": {"overwrite": True},
    "auto_configure_optimizers": False,
    "parser_kwargs": {"exit_on_error": False},
}
_QUIET = ".*args parameter is intended to run from within Python.*"  # tune builds every trial from Python


class _ParseOnlyCLI(LitBigModelCLI):
    """`LitBigModelCLI` that parses (and seeds) but instantiates nothing."""

    def instantiate_classes(self) -> None:
        return None


@dataclass
class BaseConfig:
    """A parsed `lit-bigmodel fit` config: every key filled in, the seed fixed.

    Example::

        base = BaseConfig.load("configs/sft_tiny.yaml")
        base.has_key("model.init_args.learning_rate")  # True
    """

    namespace: Namespace
    parser: Any

    @classmethod
    def load(cls, config: str | os.PathLike[str] | Mapping[str, Any]) -> BaseConfig:
        """Parse a config file (or mapping); `ConfigurationError` / `MissingPathError` for bad input."""
        if isinstance(config, (str, os.PathLike)):
            _check_config_files(["-c", os.fspath(config)])
            with open(config, encoding="utf-8") as handle:
                config = yaml.safe_load(handle) or {}
        if not isinstance(config, Mapping):
            raise ConfigurationError(f"--config must be a mapping of CLI keys, got {type(config).__name__}.")
        cli = _build(_ParseOnlyCLI, dict(config))
        return cls(cli.config, cli.parser)

    def has_key(self, key: str) -> bool:
        try:
            return key in self.namespace
        except (KeyError, TypeError, AttributeError):
            return False

    def processes(self) -> int:
        """How many processes one trial runs in: ``trainer.devices`` on one node.

        Raises one `ConfigurationError` for a trial `lit-bigmodel tune` cannot launch: several nodes, a
        strategy that starts its own processes (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) on several
        devices, or a ``trainer.devices`` that is not a device count or list.

        Example::

            BaseConfig.load({"trainer": {"devices": 2, "strategy": "ddp"}, ...}).processes()  # 2
        """
        devices, accelerator = self.namespace.get("trainer.devices"), self.namespace.get("trainer.accelerator")
        nodes = self.namespace.get("trainer.num_nodes", 1)
        problems = []
        if nodes not in (1, None):
            problems.append(
                f"`trainer.num_nodes` must be 1 for `lit-bigmodel tune`, got {nodes!r}; start a worker on each "
                "machine with the same --storage instead."
            )
        count = _device_count(devices, accelerator)
        if count is None:
            problems.append(f"`trainer.devices` must be 'auto', a count >= 1 or a list of device ids, got {devices!r}.")
        start_method = _start_method(self.namespace.get("trainer.strategy"))
        if count is not None and count > 1 and start_method != "popen":
            problems.append(
                "`trainer.strategy` of a multi-device trial must start its processes with popen (e.g. 'ddp', "
                f"'fsdp', 'deepspeed'), got {start_method!r}: `lit-bigmodel tune` starts each rank itself."
            )
        if problems:
            raise ConfigurationError(" ".join(problems))
        assert count is not None
        return count

    def with_values(self, values: Mapping[str, Any]) -> Namespace:
        namespace = self.namespace.clone()
        for key, value in values.items():
            namespace[key] = value
        return namespace

    def dump(self, namespace: Namespace) -> str:
        """``namespace`` as a YAML config that ``lit-bigmodel fit -c`` reads."""
        return str(self.parser.dump(namespace, skip_none=False))


@dataclass
class TrialResult:
    """What one fitted trial gave: the final ``monitor`` value, the steps trained, every final metric."""

    value: float
    global_step: int
    pruned: bool
    metrics: dict[str, float]


def point_logger_at_trial(namespace: Namespace, run_dir: str) -> None:
    """Give the config's logger the trial's folder; a W&B run is named after the trial and grouped by study.

    The group is the study folder's name (``run_dir``'s parent), the run's name the trial folder's
    (``trial_<n>``), unless the config sets them.

    Example::

        point_logger_at_trial(namespace, "runs/tune_sft_tiny/trial_3")
    """
    logger = namespace.get("trainer.logger")
    if not (isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace)):
        return
    for key in ("save_dir", "root_dir"):
        if key in logger.init_args:
            logger.init_args[key] = run_dir
    if str(logger.get("class_path", "")).endswith("WandbLogger"):
        folder = os.path.abspath(run_dir)
        if logger.init_args.get("group") is None:
            logger.init_args["group"] = os.path.basename(os.path.dirname(folder))
        if logger.init_args.get("name") is None:
            logger.init_args["name"] = os.path.basename(folder)


def run_trial(base: BaseConfig, values: Mapping[str, Any], run_dir: str, callbacks: list[Callback]) -> TrialResult:
    """Fit the config with ``values`` applied; logs, checkpoints and ``config.yaml`` go under ``run_dir``.

    ``callbacks`` are added to the config's own (the first `TrialPruning` among them decides ``pruned``).
    Input errors of the trial raise `LitBigModelError` before training.

    Example::

        result = run_trial(base, {"model.init_args.learning_rate": 1e-3}, "study/trial_0", [TrialPruning(trial, "val/loss")])
    """
    from lit_bigmodel.tuning.pruning import TrialPruning

    namespace = base.with_values(values)
    namespace["trainer.default_root_dir"] = run_dir
    point_logger_at_trial(namespace, run_dir)
    for key, off in (("export_dir", None), ("test_after_fit", False)):
        if key in namespace:
            namespace[key] = off  # a trial trains and validates; best.yaml keeps the config's own settings
    cli = _build(LitBigModelCLI, namespace, trainer_defaults={"callbacks": list(callbacks)})
    problems = _model_problems(cli.model)
    if cli.datamodule is not None:
        _check_data(cli.datamodule)
    if problems:
        raise ConfigurationError(" ".join(problems))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    pruning = next((c for c in callbacks if isinstance(c, TrialPruning)), None)
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items() if value.numel() == 1}
    monitor = pruning.monitor if pruning is not None else None
    return TrialResult(
        value=metrics.get(monitor, float("nan")) if monitor else float("nan"),
        global_step=int(cli.trainer.global_step),
        pruned=pruning is not None and pruning.pruned_at_step is not None,
        metrics=metrics,
    )


def _device_count(devices: Any, accelerator: Any) -> int | None:
    """The number of devices (processes) ``trainer.devices`` asks for on one node; None if it is not one."""
    if isinstance(devices, str) and "," in devices:
        devices = [item for item in devices.split(",") if item.strip()]
    if isinstance(devices, (list, tuple)):
        return len(devices) or None
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1) and not isinstance(devices, bool):
        import torch

        on_cuda = accelerator in ("auto", "gpu", "cuda", None) and torch.cuda.is_available()
        return max(1, torch.cuda.device_count()) if on_cuda else 1
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    return None


def _start_method(strategy: Any) -> str:
    """How a strategy starts its processes: ``popen`` (Lightning re-runs the command; or nothing to start),
    ``spawn``, ``fork`` or ``forkserver``."""
    if isinstance(strategy, Namespace):
        return str(strategy.get("init_args.start_method", "popen") or "popen")
    name = str(strategy)
    for method in ("forkserver", "spawn", "fork"):
        if method in name:
            return method
    return "fork" if "notebook" in name else "popen"


def _build(cli_class: type[LitBigModelCLI], args: Any, **kwargs: Any) -> LitBigModelCLI:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QUIET)
        try:
            return cli_class(args=args, run=False, **_CLI_KWARGS, **kwargs)
        except ArgumentError as err:
            raise ConfigurationError(f"--config: {_parser_message(str(err))}") from err
