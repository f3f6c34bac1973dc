"""`EarlyStopping`: Lightning's early stopping that puts the best weights back, keeps them across resume, and
decides the same on every rank."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lit_bigmodel._checks import check_number
from lit_bigmodel._sharding import is_sharded
from lit_bigmodel.errors import ConfigurationError


class EarlyStopping(LightningEarlyStopping):
    """Stop when a monitored metric stops improving, and put the best weights back when fit ends.

    A drop-in replacement for ``lightning.pytorch.callbacks.EarlyStopping`` (same arguments, same
    stopping rules) that adds:

    - ``restore_best_weights=True``: each time the metric improves, a copy of ``pl_module.state_dict()``
      is kept in CPU memory; when ``fit`` ends (stopped early or not: ``on_fit_end``) it is loaded back, so
      the module holds the weights of its best check. Those are the weights that
      ``ModelCheckpoint(monitor=..., save_top_k=1)`` saves at the same check; a ``last.ckpt`` written at the
      end of training keeps the last weights, which go with its optimizer state.
    - **Resume**: the best score *and* the best weights are in the checkpoint (the callback's state), so a
      resumed run restores the best weights even when they were found before the interruption. The
      checkpoint grows by one copy of the weights.
    - **Adapters**: with ``peft`` adapters (``SFTModule(peft=...)``, ``DistillationModule(peft=...)``) the copy
      holds the trainable weights only (adapters, projections, buffers): the frozen base and teacher do not
      change during fit, and an adapter-only checkpoint stays adapter-only.
    - **Ranks agree**: the monitored value is averaged across ranks before it is compared (Lightning's
      callback compares each rank's own value, so ranks could keep different counters). Improvement,
      patience, the stop and the restored weights are the same on all ranks. Under DDP only rank 0 keeps
      the copy; the other ranks receive it by broadcast when fit ends (one copy in host memory).
    - A ``state_key`` of its own: it can sit next to Lightning's ``EarlyStopping`` on the same metric.

    Sharded strategies (``FSDPStrategy``, ``DeepSpeedStrategy``, ``ModelParallelStrategy``) hold no full
    copy of the weights on one rank, so ``restore_best_weights=True`` is refused there with a clear error;
    use ``restore_best_weights=False`` and ``ModelCheckpoint(monitor=..., save_top_k=1)``, then load
    ``checkpoint_callback.best_model_path``.

    Args:
        monitor, min_delta, patience, verbose, mode, strict, check_finite, stopping_threshold,
        divergence_threshold, check_on_train_epoch_end, log_rank_zero_only: as Lightning's ``EarlyStopping``.
        restore_best_weights: load the weights of the best check back when fit ends.

    Attributes:
        best_weights: the kept copy (on rank 0), or None.
        best_epoch, best_step: where the best score was reached (-1: not yet).

    Raises:
        ConfigurationError: (a ``ValueError``) an invalid argument, named; ``restore_best_weights=True``
            under a sharded strategy (at setup).

    Example::

        from lit_bigmodel.callbacks import EarlyStopping

        stopper = EarlyStopping("val_loss", patience=3, restore_best_weights=True)
        L.Trainer(max_epochs=100, callbacks=[stopper]).fit(model, datamodule)
        print(stopper.best_score, stopper.best_epoch)  # model now holds the weights of that epoch
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        restore_best_weights: bool = True,
    ) -> None:
        problems = []
        if not (isinstance(monitor, str) and monitor):
            problems.append(f"`monitor` must name a logged metric, got {monitor!r}.")
        problems += [
            problem
            for problem in (
                check_number("min_delta", min_delta, low=0.0),
                check_number("patience", patience, low=0, integer=True),
            )
            if problem
        ]
        if mode not in ("min", "max"):
            problems.append(f"`mode` must be 'min' or 'max', got {mode!r}.")
        for name, value in (("stopping_threshold", stopping_threshold), ("divergence_threshold", divergence_threshold)):
            if value is not None and check_number(name, value) is not None:
                problems.append(f"`{name}` must be a finite number or None, got {value!r}.")
        if not isinstance(restore_best_weights, bool):
            problems.append(f"`restore_best_weights` must be True or False, got {restore_best_weights!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.restore_best_weights = restore_best_weights
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_epoch = -1
        self.best_step = -1
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        return "lit_bigmodel." + self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.restore_best_weights and is_sharded(trainer):
            raise ConfigurationError(
                f"EarlyStopping(restore_best_weights=True) keeps a full copy of the weights, which "
                f"{type(trainer.strategy).__name__} shards across ranks. Use restore_best_weights=False with "
                f"ModelCheckpoint(monitor=..., save_top_k=1) and load `checkpoint_callback.best_model_path` after fit."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 and not trainer.is_global_zero:
            self.best_weights = None  # a resumed run: rank 0 keeps the copy, the others get it at the end

    # ------------------------------------------------------------------ the check
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        try:
            super()._run_early_stopping_check(trainer)
        finally:
            self._trainer = None

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank compares the same value
            local = current.detach().float().clone().to(trainer.strategy.root_device)
            current = trainer.strategy.reduce(local, reduce_op="mean")
        previous_best = self.best_score
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if self.best_score is not previous_best and trainer is not None:  # improved
            self.best_epoch, self.best_step = trainer.current_epoch, trainer.global_step
            if self.restore_best_weights and (trainer.world_size == 1 or trainer.is_global_zero):
                module = trainer.lightning_module
                frozen = _frozen_keys(module)
                self.best_weights = {
                    k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items() if k not in frozen
                }
        return should_stop, reason

    # ------------------------------------------------------------------ the restore
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `on_fit_end`, not `on_train_end`: ModelCheckpoint may save `last.ckpt` in `on_train_end`, and that file must
        # keep the last weights that go with its optimizer state. The strategy has torn down (the module may be on
        # the CPU now); the process group is still there.
        if not self.restore_best_weights:
            return
        distributed = trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        have = self.best_weights is not None
        if distributed:
            have = bool(trainer.strategy.broadcast(have, src=0))
        if not have:
            return
        frozen = _frozen_keys(pl_module)
        if self.best_weights is not None:
            result = pl_module.load_state_dict(self.best_weights, strict=not frozen)
            misfits = sorted(set(result.missing_keys) - frozen) + list(result.unexpected_keys)
            if misfits:
                raise RuntimeError(f"EarlyStopping: the kept best weights do not fit the module: {misfits[:5]}.")
        if distributed:  # rank 0 sends its copy into the other ranks' tensors (through the device NCCL needs)
            device = trainer.strategy.root_device
            for key, tensor in pl_module.state_dict().items():
                if key in frozen:
                    continue
                buffer = tensor.to(device).contiguous()
                torch.distributed.broadcast(buffer, src=0)
                if buffer is not tensor:
                    tensor.copy_(buffer)
        rank_zero_info(
            f"EarlyStopping: restored the best weights ({self.monitor}={float(self.best_score):.6g}, "
            f"epoch {self.best_epoch}, step {self.best_step})."
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            restore_best_weights=self.restore_best_weights,
            best_weights=self.best_weights,
            best_epoch=self.best_epoch,
            best_step=self.best_step,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_weights = state_dict.get("best_weights")
        self.best_epoch = int(state_dict.get("best_epoch", -1))
        self.best_step = int(state_dict.get("best_step", -1))


def _frozen_keys(module: torch.nn.Module) -> set[str]:
    """State-dict keys of the frozen parameters of a module that trains ``peft`` adapters; empty for any other.

    Only with adapters: in full fine-tuning a frozen parameter may be unfrozen later (a backbone thawed by a
    callback), so the copy keeps every weight.
    """
    if getattr(module, "adapters", None) is None:
        return set()
    return {name for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad}
