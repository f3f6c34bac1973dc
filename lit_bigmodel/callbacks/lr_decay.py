"""`LRDecay`: set every param group's learning rate from a closed-form schedule at each real optimizer step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.hooks import RemovableHandle

from lit_bigmodel.callbacks._steps import torch_optimizer, watch_real_steps
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.schedules import DECAY_SHAPES, NEEDS_TOTAL_STEPS, SCHEDULES, LRSchedule

GroupScales = Sequence[float] | Mapping[int, Sequence[float]]


class LRDecay(Callback):
    """Set every optimizer's learning rate from a schedule at each optimizer step.

    The base rate ``α0`` of each param group is read from the optimizer when training starts: the group's
    ``initial_lr`` where a torch scheduler recorded it, else its ``lr`` (and kept in the checkpoint, so a
    resumed run does not re-read a decayed rate). With ``t`` the number of *real* optimizer steps taken so far and
    ``τ = t − warmup_steps``, the rate of the next step is

    ========================  ===============================================================
    ``"constant"``            ``α0``
    ``"step"``                ``α0 · decay_rate ^ floor(τ / decay_steps)``
    ``"exponential"``         ``α0 · decay_rate ^ (τ / decay_steps)``
    ``"inverse_time"``        ``α0 / (1 + decay_rate · τ / decay_steps) ^ power``
    ``"cosine"``              ``min_lr + (α0 − min_lr) · ½ (1 + cos(π τ / (total_steps − warmup_steps)))``
    ``"linear"``              ``min_lr + (α0 − min_lr) · (1 − τ / (total_steps − warmup_steps))``
    ``"wsd"``                 ``α0`` until step ``decay_start``, then ``decay_shape`` down to ``min_lr`` at
                              ``total_steps`` (warmup–stable–decay)
    ``"plateau"``             ``α0 · factor ^ k`` after ``k`` reductions on plateaus of ``monitor``
    ========================  ===============================================================

    and ``α0 · (t + 1) / warmup_steps`` during the warmup, for every schedule (the warmup of `SFTModule`'s
    built-in schedule too: both are `lit_bigmodel.schedules.LRSchedule`). ``min_lr`` is a floor for all
    schedules; each group's rate is finally multiplied by its ``group_scales`` factor.

    **Who owns the rate.** ``LRDecay`` does, for the optimizers it schedules (the rule is written in
    `lit_bigmodel.schedules`): `SFTModule` and `DistillationModule` then install no scheduler of their own
    (they ask `callback_sets_learning_rate`, which calls `sets_learning_rate`). A scheduler that a module
    still returns for a scheduled optimizer is overridden, with a warning: ``α0`` is the rate it started
    from, and ``LRDecay`` sets the rate again after Lightning steps it, so after fit the optimizer holds
    ``LRDecay``'s rate of the next step.

    **What a step is.** The counter advances after ``optimizer.step()`` really updated parameters (a
    per-optimizer step post-hook, see ``callbacks/_steps.py``): accumulation micro-batches do not count, so
    gradient accumulation does not shorten the warmup; a step that the fp16 ``GradScaler`` skipped
    (inf/NaN gradients) does not count; and manual optimization needs nothing special. Each optimizer has
    its own counter (a GAN's generator and discriminator each follow their schedule).

    The rate is logged as ``lr/opt{i}/group{g}`` at each optimizer step (``log=True``).

    Args:
        schedule: one of ``"constant"``, ``"step"``, ``"exponential"``, ``"inverse_time"``, ``"cosine"``,
            ``"linear"``, ``"wsd"``, ``"plateau"``.
        warmup_steps: linear warmup over this many optimizer steps (any schedule).
        total_steps: optimizer steps of the whole run (``cosine``, ``linear``, ``wsd``); default
            ``trainer.estimated_stepping_batches``. Pass it for manual optimization, where each optimizer
            steps a different number of times.
        min_lr: the rate never goes below it (absolute, before ``group_scales``); ``cosine``, ``linear``
            and ``wsd`` reach it at ``total_steps``.
        decay_rate: ``γ`` of ``step`` and ``exponential`` (in (0, 1]), ``β`` of ``inverse_time`` (> 0).
        decay_steps: ``s`` of ``step`` and ``exponential`` (required), of ``inverse_time`` (default 1).
        power: exponent of ``inverse_time``.
        decay_start: ``wsd``: the step where the decay starts (an ``int``), or that fraction of
            ``total_steps`` (a ``float`` in [0, 1]).
        decay_shape: ``wsd``: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
        monitor: ``plateau``: the logged metric to watch (averaged across ranks).
        mode: ``plateau``: ``"min"`` or ``"max"``.
        factor: ``plateau``: multiply the rate by this on a plateau, in (0, 1).
        patience: ``plateau``: checks without improvement that are tolerated; the next one reduces
            (as ``torch.optim.lr_scheduler.ReduceLROnPlateau``).
        cooldown: ``plateau``: checks to wait after a reduction before counting again.
        min_delta: ``plateau``: an improvement must beat the best value by more than this.
        check_on_train_epoch_end: ``plateau``: check at the end of the training epoch instead of after
            validation; default as Lightning's ``EarlyStopping``.
        group_scales: a factor per param group (``[1.0, 0.1]``), or a mapping optimizer index → factors.
        optimizers: indices of the optimizers to schedule; ``None``: all.
        log: log the learning rates.

    Raises:
        ConfigurationError: (a ``ValueError``) an invalid argument, named; at train start: no
            ``total_steps`` for a run of unknown length, ``group_scales`` that do not match the param groups,
            an optimizer index that does not exist, ``monitor`` not logged.

    Example::

        from lit_bigmodel.callbacks import LRDecay

        trainer = L.Trainer(max_steps=10_000, accumulate_grad_batches=4,
                            callbacks=[LRDecay("cosine", warmup_steps=500, min_lr=1e-5)])
        LRDecay("inverse_time", warmup_steps=100, decay_rate=0.5).plot(total_steps=2000, base_lr=3e-4)
    """

    def __init__(
        self,
        schedule: str = "cosine",
        *,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr: float = 0.0,
        decay_rate: float | None = None,
        decay_steps: int | None = None,
        power: float = 1.0,
        decay_start: int | float = 0.8,
        decay_shape: str = "linear",
        monitor: str | None = None,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        cooldown: int = 0,
        min_delta: float = 0.0,
        check_on_train_epoch_end: bool | None = None,
        group_scales: GroupScales | None = None,
        optimizers: Sequence[int] | None = None,
        log: bool = True,
    ) -> None:
        super().__init__()
        problems = _check_arguments(
            schedule, warmup_steps, total_steps, min_lr, decay_rate, decay_steps, power, decay_start, decay_shape,
            monitor, mode, factor, patience, cooldown, min_delta, group_scales, optimizers,
        )  # fmt: skip
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = float(min_lr)
        self.decay_rate = decay_rate
        self.decay_steps = decay_steps
        self.power = float(power)
        self.decay_start = decay_start
        self.decay_shape = decay_shape
        self.monitor, self.mode, self.factor = monitor, mode, float(factor)
        self.patience, self.cooldown, self.min_delta = patience, cooldown, float(min_delta)
        self.group_scales = group_scales
        self.optimizer_indices = None if optimizers is None else list(optimizers)
        self.log = log
        self._check_on_train_epoch_end = check_on_train_epoch_end
        # state (in the checkpoint)
        self.steps: dict[int, int] = {}  # optimizer index → real optimizer steps taken
        self.initial_lrs: dict[int, list[float]] = {}  # optimizer index → α0 of each param group
        self.best: float | None = None  # plateau
        self.wait = 0
        self.cooldown_counter = 0
        self.reductions = 0
        # per fit
        self._resolved: LRSchedule | None = None
        self._handles: list[RemovableHandle] = []
        self._index_of: dict[int, int] = {}  # id(optimizer) → index
        self._optimizers: dict[int, Any] = {}

    # ------------------------------------------------------------------ the schedule
    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule, optimizers=self.optimizer_indices)

    def sets_learning_rate(self, optimizer_index: int) -> bool:
        """Whether this callback owns the learning rate of optimizer ``optimizer_index`` (see `lit_bigmodel.schedules`)."""
        return self.optimizer_indices is None or optimizer_index in self.optimizer_indices

    def build_schedule(self, total_steps: int | None = None) -> LRSchedule:
        """The closed-form `LRSchedule` for a run of ``total_steps`` optimizer steps (default: ``self.total_steps``)."""
        total = total_steps if total_steps is not None else self.total_steps
        problems = []
        if self.schedule in NEEDS_TOTAL_STEPS:
            if total is None or not math.isfinite(total):
                problems.append(
                    f"`total_steps` is needed by schedule={self.schedule!r}: pass it, or give the Trainer "
                    f"`max_steps` or `max_epochs`; got {total!r}."
                )
            elif total <= self.warmup_steps:
                problems.append(f"`total_steps` must be > `warmup_steps` ({self.warmup_steps}), got {total!r}.")
        decay_start = 0
        if self.schedule == "wsd" and not problems:
            assert total is not None
            start = self.decay_start
            decay_start = round(start * total) if isinstance(start, float) else int(start)
            if not self.warmup_steps <= decay_start <= total:
                problems.append(
                    f"`decay_start` must fall in [warmup_steps, total_steps] = [{self.warmup_steps}, {total}], "
                    f"got {self.decay_start!r} (step {decay_start})."
                )
        if problems:
            raise ConfigurationError(" ".join(problems))
        default_steps = 1 if self.schedule == "inverse_time" else 0
        return LRSchedule(
            name=self.schedule,
            warmup_steps=self.warmup_steps,
            total_steps=int(total) if total is not None and self.schedule in NEEDS_TOTAL_STEPS else None,
            min_lr=self.min_lr,
            decay_rate=1.0 if self.decay_rate is None else float(self.decay_rate),
            decay_steps=self.decay_steps or default_steps or 1,
            power=self.power,
            decay_start=decay_start,
            decay_shape=self.decay_shape,
        )

    def lr_at(self, step: int, base_lr: float, optimizer_index: int = 0, group: int = 0) -> float:
        """The rate that step ``step`` of group ``group`` of optimizer ``optimizer_index`` gets (during fit)."""
        schedule = self._resolved if self._resolved is not None else self.build_schedule()
        return self._scale(optimizer_index, group) * schedule.lr(step, base_lr, self.factor**self.reductions)

    def plot(self, total_steps: int | None = None, base_lr: float = 1.0, path: str | None = None) -> Any:
        """Draw the learning rate against the optimizer step (no plateau reductions); return the matplotlib Figure.

        Args:
            total_steps: steps to draw; default ``self.total_steps``, or ``2 × warmup_steps + 100``.
            base_lr: ``α0`` (the optimizer's rate).
            path: also save the figure there.

        Raises:
            ModuleNotFoundError: matplotlib is not installed.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ModuleNotFoundError("`LRDecay.plot()` needs matplotlib: `pip install matplotlib`.") from error
        steps = total_steps or self.total_steps or 2 * self.warmup_steps + 100
        schedule = self.build_schedule(steps)
        scales = self._plot_scales()
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for group, scale in enumerate(scales):
            label = f"group {group} (×{scale:g})" if len(scales) > 1 else None
            axes.plot(range(steps), [scale * schedule.lr(t, base_lr) for t in range(steps)], label=label)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("learning rate")
        axes.set_title(f"LRDecay({self.schedule!r}, warmup_steps={self.warmup_steps})")
        if len(scales) > 1:
            axes.legend()
        figure.tight_layout()
        if path is not None:
            figure.savefig(path)
        return figure

    def _plot_scales(self) -> list[float]:
        scales = self.group_scales
        if scales is None:
            return [1.0]
        if isinstance(scales, Mapping):
            return [float(s) for s in next(iter(scales.values()), [1.0])]
        return [float(s) for s in scales]

    def _scale(self, index: int, group: int) -> float:
        scales = self.group_scales
        if scales is None:
            return 1.0
        if isinstance(scales, Mapping):
            return float(scales[index][group]) if index in scales else 1.0
        return float(scales[group])

    # ------------------------------------------------------------------ training hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._check_on_train_epoch_end is None:
            self._check_on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        indices = list(range(len(optimizers))) if self.optimizer_indices is None else self.optimizer_indices
        problems = [
            f"`optimizers` has index {i}, but the module has {len(optimizers)}."
            for i in indices
            if i >= len(optimizers)
        ]
        total = self.total_steps
        if total is None and self.schedule in NEEDS_TOTAL_STEPS:
            estimate = trainer.estimated_stepping_batches
            total = int(estimate) if math.isfinite(estimate) else None
        for i in indices:
            if i >= len(optimizers):
                continue
            groups = optimizers[i].param_groups
            if i not in self.initial_lrs:  # a fresh run; a resumed one keeps the α0 of its checkpoint
                self.initial_lrs[i] = [float(g.get("initial_lr", g["lr"])) for g in groups]
            self.steps.setdefault(i, 0)
            if len(self.initial_lrs[i]) != len(groups):
                problems.append(
                    f"optimizer {i} has {len(groups)} param groups, its checkpoint {len(self.initial_lrs[i])}."
                )
            expected = self._expected_scales(i)
            if expected is not None and len(expected) != len(groups):
                problems.append(
                    f"`group_scales` has {len(expected)} factors for optimizer {i}, which has {len(groups)} param groups."
                )
            if self.schedule in ("cosine", "linear", "wsd") and any(lr < self.min_lr for lr in self.initial_lrs[i]):
                problems.append(
                    f"`min_lr` ({self.min_lr}) must be <= the optimizer's learning rates, got {self.initial_lrs[i]} for optimizer {i}."
                )
        if problems:
            raise ConfigurationError(" ".join(problems))
        self._resolved = self.build_schedule(total)
        scheduled = [optimizers[i] for i in indices]
        if any(getattr(c.scheduler, "optimizer", None) in scheduled for c in trainer.lr_scheduler_configs):
            rank_zero_warn("LRDecay sets the learning rate at each step: the module's LR scheduler is overridden.")
        self._remove_hooks()
        for i in indices:
            optimizer = optimizers[i]
            self._optimizers[i] = optimizer
            self._index_of[id(optimizer)] = i
            inner = torch_optimizer(optimizer)
            if inner is not None:
                self._index_of[id(inner)] = i
            self._handles.append(watch_real_steps(optimizer, self._stepped_callback(i)))
            self._apply(i)
        horizon = f", total_steps={self._resolved.total_steps}" if self._resolved.total_steps else ""
        rank_zero_info(
            f"LRDecay: {self.schedule!r} (warmup_steps={self.warmup_steps}{horizon}) from base learning rates "
            f"{self.initial_lrs}, at optimizer steps {self.steps}."
        )

    def _expected_scales(self, index: int) -> Sequence[float] | None:
        scales = self.group_scales
        if scales is None:
            return None
        if isinstance(scales, Mapping):
            return scales.get(index)
        return scales

    def _stepped_callback(self, index: int) -> Any:
        def stepped() -> None:
            self.steps[index] += 1
            self._apply(index)  # the rate of the next step, also for a step taken outside Lightning's hooks

        return stepped

    def _apply(self, index: int) -> None:
        optimizer, t = self._optimizers[index], self.steps[index]
        for g, group in enumerate(optimizer.param_groups):
            group["lr"] = self.lr_at(t, self.initial_lrs[index][g], index, g)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = self._index_of.get(id(optimizer))
        if index is None:
            return
        self._apply(index)  # again, in case a scheduler of the module changed it since
        if self.log:
            for g, group in enumerate(self._optimizers[index].param_groups):
                pl_module.log(f"lr/opt{index}/group{g}", float(group["lr"]), on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for index in self._optimizers:  # after Lightning stepped the module's per-step schedulers
            self._apply(index)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index in self._optimizers:  # after the last scheduler steps: the optimizer keeps LRDecay's rate
            self._apply(index)
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._index_of, self._optimizers = [], {}, {}

    # ------------------------------------------------------------------ plateau
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._check_on_train_epoch_end:
            self._plateau_check(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._check_on_train_epoch_end:
            self._plateau_check(trainer)

    def _plateau_check(self, trainer: pl.Trainer) -> None:
        if self.schedule != "plateau" or trainer.sanity_checking or not self._optimizers:
            return
        assert self.monitor is not None
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            available = ", ".join(f"`{k}`" for k in trainer.callback_metrics) or "none"
            raise ConfigurationError(f"`monitor` {self.monitor!r} was not logged; logged metrics: {available}.")
        current = torch.as_tensor(value, dtype=torch.float32).detach().clone().to(trainer.strategy.root_device)
        current_value = float(trainer.strategy.reduce(current, reduce_op="mean"))  # the same on every rank
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * current_value < sign * self.best - self.min_delta:
            self.best, self.wait = current_value, 0
        else:
            self.wait += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.wait > self.patience:
            self.reductions += 1
            self.cooldown_counter, self.wait = self.cooldown, 0
            for index in self._optimizers:
                self._apply(index)
            rank_zero_info(
                f"LRDecay: {self.monitor} did not improve on {self.best:.4g} for {self.patience + 1} checks; "
                f"learning rates × {self.factor} (reduction {self.reductions})."
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": dict(self.steps),
            "initial_lrs": {i: list(lrs) for i, lrs in self.initial_lrs.items()},
            "plateau": {
                "best": self.best,
                "wait": self.wait,
                "cooldown_counter": self.cooldown_counter,
                "reductions": self.reductions,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = {int(i): int(n) for i, n in state_dict.get("steps", {}).items()}
        self.initial_lrs = {int(i): [float(x) for x in lrs] for i, lrs in state_dict.get("initial_lrs", {}).items()}
        plateau = state_dict.get("plateau", {})
        self.best = plateau.get("best")
        self.wait = int(plateau.get("wait", 0))
        self.cooldown_counter = int(plateau.get("cooldown_counter", 0))
        self.reductions = int(plateau.get("reductions", 0))


def _check_arguments(
    schedule: str,
    warmup_steps: int,
    total_steps: int | None,
    min_lr: float,
    decay_rate: float | None,
    decay_steps: int | None,
    power: float,
    decay_start: int | float,
    decay_shape: str,
    monitor: str | None,
    mode: str,
    factor: float,
    patience: int,
    cooldown: int,
    min_delta: float,
    group_scales: GroupScales | None,
    optimizers: Sequence[int] | None,
) -> list[str]:
    """One sentence per invalid argument, so that a configuration is fixed in one pass."""
    problems = []
    if schedule not in SCHEDULES:
        problems.append(f"`schedule` must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}.")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        problems.append(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}.")
    if total_steps is not None and (not _is_int(total_steps) or total_steps < 1):
        problems.append(f"`total_steps` must be an integer >= 1 or None, got {total_steps!r}.")
    elif (
        total_steps is not None
        and _is_int(warmup_steps)
        and schedule in NEEDS_TOTAL_STEPS
        and total_steps <= warmup_steps
    ):
        problems.append(f"`total_steps` must be > `warmup_steps` ({warmup_steps}), got {total_steps!r}.")
    if not _is_real(min_lr) or min_lr < 0:
        problems.append(f"`min_lr` must be a finite number >= 0, got {min_lr!r}.")
    if schedule in ("step", "exponential", "inverse_time") and decay_rate is None:
        problems.append(f"`decay_rate` is required by schedule={schedule!r}, got None.")
    elif (
        decay_rate is not None
        and schedule in ("step", "exponential")
        and not (_is_real(decay_rate) and 0 < decay_rate <= 1)
    ):
        problems.append(f"`decay_rate` must be in (0, 1] for schedule={schedule!r}, got {decay_rate!r}.")
    elif decay_rate is not None and not (_is_real(decay_rate) and decay_rate > 0):
        problems.append(f"`decay_rate` must be > 0, got {decay_rate!r}.")
    if schedule in ("step", "exponential") and decay_steps is None:
        problems.append(f"`decay_steps` is required by schedule={schedule!r}, got None.")
    elif decay_steps is not None and (not _is_int(decay_steps) or decay_steps < 1):
        problems.append(f"`decay_steps` must be an integer >= 1, got {decay_steps!r}.")
    if not _is_real(power) or power <= 0:
        problems.append(f"`power` must be > 0, got {power!r}.")
    if (isinstance(decay_start, float) and not 0.0 <= decay_start <= 1.0) or (
        not isinstance(decay_start, float) and (not _is_int(decay_start) or decay_start < 0)
    ):
        problems.append(
            f"`decay_start` must be a step (int >= 0) or a fraction of total_steps in [0, 1], got {decay_start!r}."
        )
    if decay_shape not in DECAY_SHAPES:
        problems.append(f"`decay_shape` must be one of {', '.join(map(repr, DECAY_SHAPES))}, got {decay_shape!r}.")
    if schedule == "plateau" and not (isinstance(monitor, str) and monitor):
        problems.append(f"`monitor` must name a logged metric for schedule='plateau', got {monitor!r}.")
    if mode not in ("min", "max"):
        problems.append(f"`mode` must be 'min' or 'max', got {mode!r}.")
    if not _is_real(factor) or not 0 < factor < 1:
        problems.append(f"`factor` must be in (0, 1), got {factor!r}.")
    if not _is_int(patience) or patience < 0:
        problems.append(f"`patience` must be an integer >= 0, got {patience!r}.")
    if not _is_int(cooldown) or cooldown < 0:
        problems.append(f"`cooldown` must be an integer >= 0, got {cooldown!r}.")
    if not _is_real(min_delta) or min_delta < 0:
        problems.append(f"`min_delta` must be >= 0, got {min_delta!r}.")
    if group_scales is not None:
        lists = list(group_scales.values()) if isinstance(group_scales, Mapping) else [group_scales]
        keys_ok = not isinstance(group_scales, Mapping) or all(_is_int(k) and k >= 0 for k in group_scales)
        values_ok = all(isinstance(s, Sequence) and len(s) > 0 and all(_is_real(x) and x > 0 for x in s) for s in lists)
        if not (keys_ok and values_ok):
            problems.append(
                f"`group_scales` must be a list of factors > 0 (one per param group) or a mapping optimizer index → "
                f"such a list, got {group_scales!r}."
            )
    if optimizers is not None and (
        isinstance(optimizers, str)
        or not all(_is_int(i) and i >= 0 for i in optimizers)
        or len(set(optimizers)) != len(optimizers)
        or len(optimizers) == 0
    ):
        problems.append(f"`optimizers` must be None or distinct optimizer indices >= 0, got {optimizers!r}.")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
