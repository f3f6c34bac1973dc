"""`TrialPruning`: report a trial's metric to Optuna at each validation and stop the trial when told to.

Rank zero reports ``monitor`` and asks the study's pruner; the decision is broadcast so every rank
stops at the same step. Modules without a validation loop (SeqGANModule, whose ``nll_oracle`` is logged
during training) report at the end of each training epoch instead, when the epoch logged a new value:
an epoch end before the first value, or one that still holds the value reported last, reports nothing.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lit_bigmodel.errors import ConfigurationError


class TrialPruning(Callback):
    """Report ``monitor`` to an Optuna trial at each validation; stop training when its pruner says so.

    Args:
        trial: the Optuna trial, or anything with its ``report(value, step)`` and ``should_prune()``
            (`TrialChannel` on rank zero of a multi-device trial); None on the other ranks, which follow
            rank zero's decision.
        monitor: the logged metric the study optimizes, e.g. ``val/loss``.

    Raises:
        ConfigurationError: at the first validation (or at the end of fit) if ``monitor`` was never
            logged; the message lists the metrics that were.

    Example::

        trainer = Trainer(max_steps=100, val_check_interval=20, callbacks=[TrialPruning(trial, "val/loss")])
    """

    def __init__(self, trial: Any, monitor: str) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigurationError(f"`monitor` must be a non-empty metric name, got {monitor!r}.")
        self.trial = trial
        self.monitor = monitor
        self.pruned_at_step: int | None = None
        self.reported: dict[int, float] = {}
        self._validated = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validated = True
        self._report(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._validated:  # the same on every rank, so every rank joins the broadcast
            self._report(trainer, required=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_logged(trainer)

    def check_logged(self, trainer: pl.Trainer) -> None:
        """Raise `ConfigurationError` naming the logged metrics if ``monitor`` is not among them."""
        if self.monitor not in trainer.callback_metrics:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise ConfigurationError(
                f"`monitor` {self.monitor!r} was never logged; the trial logged: {logged}. "
                "Set `monitor` in the search file to one of them."
            )

    def _report(self, trainer: pl.Trainer, required: bool = True) -> None:
        """Report on rank zero (if ``monitor`` is logged; ``required``: raise if not) and follow its decision."""
        if required:
            self.check_logged(trainer)
        step = trainer.global_step
        should_prune = False
        value = float(trainer.callback_metrics[self.monitor]) if self.monitor in trainer.callback_metrics else None
        last = self.reported[max(self.reported)] if self.reported else None
        new = value is not None and (required or not _same(value, last))
        if trainer.is_global_zero and self.trial is not None and step not in self.reported and new:
            assert value is not None
            self.reported[step] = value
            self.trial.report(value if math.isfinite(value) else math.nan, step)
            should_prune = bool(self.trial.should_prune())
        should_prune = bool(trainer.strategy.broadcast(should_prune, src=0))
        if should_prune:
            self.pruned_at_step = step
            trainer.should_stop = True


def _same(value: float, last: float | None) -> bool:
    """Whether ``value`` is the one reported last (NaN counts as equal to NaN)."""
    return last is not None and (value == last or (math.isnan(value) and math.isnan(last)))
