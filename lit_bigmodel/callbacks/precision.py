"""Precision: `auto_precision()` picks the Trainer's precision flag, `PrecisionMonitor` watches fp16/bf16 training.

`PrecisionMonitor` logs the loss scale, counts the optimizer steps skipped by overflow, logs the
unscaled gradient norm, and acts on non-finite losses or gradients (``"warn" | "skip" | "stop"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.hooks import RemovableHandle

from lit_bigmodel._checks import check_number
from lit_bigmodel.callbacks._steps import drop_grads, has_grads, torch_optimizer, watch_real_steps
from lit_bigmodel.errors import ConfigurationError

POLICIES = ("warn", "skip", "stop")


@dataclass(frozen=True)
class PrecisionChoice:
    """What `auto_precision` chose: ``precision`` (a Trainer flag) and ``reason`` (one sentence)."""

    precision: str
    reason: str

    def __str__(self) -> str:
        return self.precision


def auto_precision(device: str | torch.device | None = None, *, log: bool = True) -> PrecisionChoice:
    """Choose ``"bf16-mixed"`` where the hardware runs bf16 natively, else ``"16-mixed"``, else ``"32-true"``.

    - CUDA: bf16 on compute capability >= 8.0 (A100, H100, RTX 30xx and later); fp16 with a
      ``GradScaler`` from 7.0 (V100, T4: tensor cores) down to 5.3; fp32 below.
    - CPU: bf16 where the CPU has AVX512-BF16 or AMX; otherwise fp32 (bf16 would be emulated, and
      Lightning runs ``"16-mixed"`` as bf16 on CPU anyway).
    - Other devices (MPS, XLA): fp32, since autocast support there depends on versions; choose yourself.

    Args:
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ...; default: CUDA when available, else CPU.
        log: also log the choice and its reason (rank zero).

    Example::

        from lit_bigmodel.callbacks import auto_precision

        choice = auto_precision()  # e.g. PrecisionChoice('bf16-mixed', 'NVIDIA H100 ... supports bf16')
        trainer = L.Trainer(precision=choice.precision)
    """
    target = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if target.type == "cuda":
        choice = _cuda_choice(target)
    elif target.type == "cpu":
        if _cpu_has_native_bf16():
            choice = PrecisionChoice(
                "bf16-mixed", "this CPU has AVX512-BF16/AMX instructions: bf16 autocast runs natively."
            )
        else:
            choice = PrecisionChoice(
                "32-true", "this CPU has no AVX512-BF16/AMX: bf16 would be emulated and slower, and fp16 needs a GPU."
            )
    else:
        choice = PrecisionChoice(
            "32-true", f"mixed precision on {target.type!r} depends on versions: choose it yourself."
        )
    if log:
        rank_zero_info(f"auto_precision: {choice.precision!r}: {choice.reason}")
    return choice


def _cuda_choice(device: torch.device) -> PrecisionChoice:
    if not torch.cuda.is_available():
        return PrecisionChoice("32-true", "CUDA was asked for but is not available.")
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) >= (8, 0):
        return PrecisionChoice("bf16-mixed", f"{name} (compute capability {major}.{minor}) supports bf16 natively.")
    if (major, minor) >= (5, 3):
        return PrecisionChoice(
            "16-mixed",
            f"{name} (compute capability {major}.{minor}) has no native bf16: fp16 with a GradScaler instead.",
        )
    return PrecisionChoice("32-true", f"{name} (compute capability {major}.{minor}) has no fast fp16 or bf16.")


def _cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


class PrecisionMonitor(Callback):
    """Watch mixed-precision training: loss scale, skipped steps, unscaled gradient norm, non-finite values.

    Logged (``pl_module.log``, every ``log_every_n_steps`` optimizer steps):

    - ``precision/loss_scale``: the fp16 ``GradScaler``'s scale (Lightning's ``16-mixed``), or DeepSpeed's
      fp16 loss scale (``deepspeed_engine.optimizer.loss_scale`` / ``cur_scale``); absent for bf16/fp32.
    - ``precision/skipped_steps``: optimizer steps attempted with gradients that did not update the weights
      (the ``GradScaler`` skipped them for inf/NaN, or this callback dropped them); under DeepSpeed, the
      engine's ``skipped_steps``. Counted without a device sync, through the step hook ``LRDecay`` uses.
    - ``precision/grad_norm`` (``precision/grad_norm/opt{i}`` with several optimizers): the 2-norm of the
      gradients after Lightning unscaled them (it unscales before ``on_before_optimizer_step``; this
      callback never unscales, so nothing is unscaled twice; for fused optimizers, which unscale inside
      ``step()``, the norm is divided by the scale). Under FSDP it is the local shard's norm.

    **Non-finite values.** Every ``check_every_n_steps`` optimizer steps, the loss (``on_before_backward``,
    automatic and manual optimization) and the gradient norm are checked; that needs a device sync, hence
    the interval. The finding is reduced across ranks, so every rank acts alike:

    - ``"warn"``: warn (rank zero). With a ``GradScaler`` the step was skipped already.
    - ``"skip"``: drop this step's gradients (``p.grad = None``), so ``optimizer.step()`` changes nothing,
      momentum and weight decay included. With a ``GradScaler`` the scaler skips inf/NaN steps by itself.
    - ``"stop"``: drop this step's gradients, and stop the Trainer after this batch, saying why.

    With fp16, a few overflows while the ``GradScaler`` finds its scale are normal; ``"stop"`` suits bf16
    and fp32 runs. ``"skip"`` is not available under DeepSpeed, whose engine holds the gradients.

    Args:
        policy: ``"warn"``, ``"skip"`` or ``"stop"``.
        check_every_n_steps: check for non-finite values every this many optimizer steps (>= 1).
        log_every_n_steps: log every this many optimizer steps; default: the Trainer's ``log_every_n_steps``.

    Attributes:
        skipped_steps: steps skipped so far (kept in the checkpoint).
        nonfinite_events: non-finite findings so far (kept in the checkpoint).
        stop_reason: why it stopped the Trainer, or None.

    Raises:
        ConfigurationError: (a ``ValueError``) an invalid argument, named; ``policy="skip"`` under DeepSpeed.

    Example::

        from lit_bigmodel.callbacks import PrecisionMonitor, auto_precision

        trainer = L.Trainer(precision=auto_precision().precision,
                            callbacks=[PrecisionMonitor(policy="stop", check_every_n_steps=10)])
    """

    def __init__(
        self, policy: str = "warn", check_every_n_steps: int = 1, log_every_n_steps: int | None = None
    ) -> None:
        super().__init__()
        problems = []
        if policy not in POLICIES:
            problems.append(f"`policy` must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}.")
        if check_number("check_every_n_steps", check_every_n_steps, low=1, integer=True) is not None:
            problems.append(f"`check_every_n_steps` must be an integer >= 1, got {check_every_n_steps!r}.")
        if log_every_n_steps is not None and check_number("log_every_n_steps", log_every_n_steps, low=1, integer=True):
            problems.append(f"`log_every_n_steps` must be an integer >= 1 or None, got {log_every_n_steps!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.policy = policy
        self.check_every_n_steps = check_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.skipped_steps = 0
        self.nonfinite_events = 0
        self.stop_reason: str | None = None
        self._calls = 0  # on_before_optimizer_step calls: the same count on every rank
        self._bad_loss = False
        self._log_due = False
        self._attempts: dict[int, int] = {}  # per optimizer, in this batch: steps tried with gradients
        self._real: dict[int, int] = {}  # per optimizer, in this batch: steps that updated the weights
        self._handles: list[RemovableHandle] = []
        self._index_of: dict[int, int] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.policy)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.policy == "skip" and _deepspeed_engine(trainer) is not None:
            raise ConfigurationError(
                "`policy`='skip' is not available under DeepSpeed, whose engine holds the gradients (its fp16 "
                "optimizer skips overflowing steps by itself); use policy='warn' or 'stop'."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        for i, optimizer in enumerate(trainer.optimizers):
            self._index_of[id(optimizer)] = i
            inner = torch_optimizer(optimizer)
            if inner is not None:
                self._index_of[id(inner)] = i
                self._handles.append(watch_real_steps(optimizer, self._counter(i)))

    def _counter(self, index: int) -> Any:
        def stepped() -> None:
            self._real[index] = self._real.get(index, 0) + 1

        return stepped

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._index_of = [], {}

    # ------------------------------------------------------------------ the checks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._attempts, self._real = {}, {}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._calls % self.check_every_n_steps == 0 and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True  # acted on at the next optimizer step, together with the gradients

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = self._index_of.get(id(optimizer), 0)
        check = self._calls % self.check_every_n_steps == 0
        log_now = self._calls % self._log_interval(trainer) == 0
        self._calls += 1
        self._log_due = self._log_due or log_now
        with_grads = has_grads(optimizer)
        if with_grads:
            self._attempts[index] = self._attempts.get(index, 0) + 1
        norm = self._grad_norm(trainer, optimizer) if with_grads and (check or log_now) else None
        if check:
            bad_grads = norm is not None and not bool(torch.isfinite(norm))
            what = " and ".join(w for w, bad in (("loss", self._bad_loss), ("gradients", bad_grads)) if bad)
            self._bad_loss = False
            found = bool(what)
            if trainer.world_size > 1:
                found = trainer.strategy.reduce_boolean_decision(found, all=False)
            if found:
                self._act(trainer, optimizer, index, what or "loss or gradients on another rank")
        if log_now and norm is not None:
            name = "precision/grad_norm" if len(trainer.optimizers) == 1 else f"precision/grad_norm/opt{index}"
            pl_module.log(name, norm.float(), on_step=True, on_epoch=False)

    def _act(self, trainer: pl.Trainer, optimizer: Any, index: int, what: str) -> None:
        self.nonfinite_events += 1
        scaler = _grad_scaler(trainer)
        message = f"PrecisionMonitor: non-finite {what} at step {trainer.global_step} (optimizer {index})"
        if scaler is not None:
            message += "; the GradScaler skips this step and lowers its scale"
        if self.policy in ("skip", "stop") and _deepspeed_engine(trainer) is None:
            drop_grads(optimizer)
        if self.policy == "stop":
            trainer.should_stop = True
            self.stop_reason = message + "; stopping."
            rank_zero_warn(self.stop_reason)
        elif self.policy == "skip":
            rank_zero_info(message + "; step skipped.")
        else:
            rank_zero_warn(message + ".")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        engine = _deepspeed_engine(trainer)
        if engine is not None:
            self.skipped_steps = int(getattr(engine, "skipped_steps", self.skipped_steps))
        else:
            for index, attempts in self._attempts.items():
                self.skipped_steps += max(0, attempts - self._real.get(index, 0))
        if not self._attempts and engine is None:
            return
        if self._log_due or trainer.should_stop:
            self._log_due = False
            scale = loss_scale(trainer)
            if scale is not None:
                pl_module.log("precision/loss_scale", scale, on_step=True, on_epoch=False)
            pl_module.log("precision/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            if engine is not None and hasattr(engine, "get_global_grad_norm"):
                norm = engine.get_global_grad_norm()
                if norm is not None:
                    pl_module.log("precision/grad_norm", float(norm), on_step=True, on_epoch=False)

    def _log_interval(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))

    def _grad_norm(self, trainer: pl.Trainer, optimizer: Any) -> torch.Tensor:
        """2-norm of the optimizer's unscaled gradients (one reduction on the device; no sync here)."""
        grads = [p.grad.detach() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor (FSDP2): the local shard
        device = grads[0].device
        fp32 = [g for g in grads if g.dtype == torch.float32 and g.device == device and not g.is_sparse]
        rest = [g for g in grads if not (g.dtype == torch.float32 and g.device == device and not g.is_sparse)]
        norms = list(torch._foreach_norm(fp32)) if fp32 else []  # one kernel launch for the usual fp32 grads
        norms += [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in rest]  # no fp16 overflow
        norm = torch.linalg.vector_norm(torch.stack(norms))
        scaler = _grad_scaler(trainer)
        if scaler is not None and getattr(torch_optimizer(optimizer), "_step_supports_amp_scaling", False):
            norm = norm / scaler.get_scale()  # a fused optimizer unscales inside step(): these are still scaled
        return norm

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "nonfinite_events": self.nonfinite_events}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.nonfinite_events = int(state_dict.get("nonfinite_events", 0))


def loss_scale(trainer: pl.Trainer) -> float | None:
    """The current fp16 loss scale: Lightning's ``GradScaler``, else DeepSpeed's fp16 optimizer; None for bf16/fp32.

    Reads a device value (a sync); call it at logging intervals.
    """
    scaler = _grad_scaler(trainer)
    if scaler is not None:
        return float(scaler.get_scale())
    engine = _deepspeed_engine(trainer)
    optimizer = getattr(engine, "optimizer", None)
    for name in ("loss_scale", "cur_scale"):
        value = getattr(optimizer, name, None)
        if value is not None and not callable(value):
            return float(value)
    return None


def _grad_scaler(trainer: pl.Trainer) -> Any:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _deepspeed_engine(trainer: pl.Trainer) -> Any:
    """``trainer.strategy.deepspeed_engine`` when the strategy is DeepSpeed's (and set up), else None."""
    try:
        return getattr(trainer.strategy, "deepspeed_engine", None)
    except Exception:  # the property of a strategy not yet set up
        return None
