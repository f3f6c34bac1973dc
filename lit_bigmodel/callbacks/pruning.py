"""`Pruning`: gradual or one-shot magnitude, structured, attention-head and N:M (2:4) pruning for any Trainer.

Goes past Lightning's ``ModelPruning``: prunes at optimizer steps (not epoch ends) on Zhu & Gupta's
cubic schedule, targets ``nn.Linear`` and Hugging Face ``Conv1D`` but never norms, biases or (unless
asked) embeddings, keeps tied weights tied, logs the sparsity counted from the weights, and keeps
plain ``weight`` tensors (no ``weight_orig`` / ``weight_mask`` reparametrization) so that
``save_pretrained`` and checkpoints see ordinary, zero-filled weights. `to_semi_structured` turns a
2:4-pruned model into ``torch.sparse`` semi-structured weights for GPU inference.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_bigmodel._checks import check_number, check_patterns
from lit_bigmodel._sharding import is_sharded
from lit_bigmodel.callbacks._pruning_methods import (
    METHODS,
    HeadLayer,
    Method,
    Target,
    cubic_sparsity,
    find_targets,
    head_masks,
    measure_sparsity,
    nm_masks,
    nm_problems,
    pack_mask,
    structured_masks,
    to_semi_structured,
    unpack_mask,
    unstructured_masks,
)
from lit_bigmodel.errors import ConfigurationError

__all__ = ["Pruning", "to_semi_structured"]

PruningSchedule = Literal["cubic", "one_shot"]
_SCHEDULES = ("cubic", "one_shot")
_SCOPES = ("layer", "global")
_DIMS = ("outputs", "inputs")


class Pruning(Callback):
    """Prune the weights of a model during training, gradually or at once, and keep them pruned.

    Methods (``method``):

    - ``"unstructured"``: the smallest ``|w|`` of each layer (``scope="layer"``) or of all targeted
      layers together (``scope="global"``).
    - ``"structured"``: whole output rows (``structured_dim="outputs"``, i.e. neurons) or input
      columns (``"inputs"``) with the smallest L1 / L2 norm (``pruning_norm``), per layer.
    - ``"heads"``: whole attention heads of Hugging Face models (GPT-2, BERT-like, Llama-like), the
      heads with the smallest norm first, per layer. Mask based: the head's query / key / value rows
      and output-projection columns are zeroed (biases kept), so shapes, checkpoints and
      ``save_pretrained`` are unchanged and the head contributes nothing to the layer output.
    - ``"n:m"``: in every group of ``m`` consecutive input weights keep the ``n`` largest (2:4 by
      default, the pattern sparse tensor cores run); ``final_sparsity`` is ``1 - n/m``.

    Schedule: ``"one_shot"`` prunes to ``final_sparsity`` once, after ``start_step`` optimizer steps
    (0: before the first step). ``"cubic"`` follows Zhu & Gupta (2017),
    s_t = s_f + (s_i - s_f)(1 - (t - t0)/(end - t0))^3, updating the masks every ``frequency``
    optimizer steps from ``start_step`` to ``end_step``. Steps count optimizer steps
    (``trainer.global_step``, so gradient accumulation is accounted for); a float in [0, 1] is a
    fraction of ``trainer.estimated_stepping_batches``.

    Mechanism: the callback holds one boolean mask per weight and multiplies the weight by it after
    every optimizer step (an ``Optimizer.register_step_post_hook``, which also runs under manual
    optimization and gradient accumulation), so pruned weights are exactly zero in every forward
    even though AdamW's momentum and weight decay would move them. Gradients are not masked. Masks
    are stored in the callback's ``state_dict`` (8 weights a byte) and restored on resume.

    Targets: the weights of ``nn.Linear`` and ``transformers.pytorch_utils.Conv1D`` modules whose
    name matches ``include`` (regular expressions, any of them; all modules if None) and no
    ``exclude`` pattern; ``nn.Embedding`` too with ``prune_embeddings=True``. Norms and biases are
    never pruned. A layer whose weight is tied to an embedding (GPT-2's ``lm_head``) is skipped unless
    ``prune_embeddings=True``; then the shared tensor is pruned once and stays tied. Targets are
    resolved in ``on_fit_start`` (after ``configure_model`` built the network); a pattern that matches
    no module is an error there.

    Distributed: works on one device and under DDP: the weights are identical on every rank, so
    each rank computes the same masks (global thresholds included) without communication. Sharded
    strategies (FSDP, DeepSpeed, ModelParallel) are refused in ``setup``: each rank holds only
    flattened shards, so per-layer masks and magnitude ranks cannot be computed locally.

    Adapters: a module with ``peft`` adapters (``SFTModule(peft=...)``) or a network holding peft adapter
    layers is refused: the base weights are frozen and the merged export adds the adapters' update to
    them (merged weight = pruned base + B·A), so the zeros would not survive the export. Prune after
    merging: export the merged model (``module.export(dir)``), then fine-tune ``SFTModule(dir)`` with
    ``Pruning`` and no ``peft``.

    Logs (rank zero) ``pruning/sparsity`` (global) and ``pruning/sparsity/<module>``, the fraction of
    exact zeros in the weights, at each mask update and every ``log_every_n_steps``.

    Args:
        method: ``"unstructured"``, ``"structured"``, ``"heads"`` or ``"n:m"``.
        final_sparsity: fraction of the targeted weights pruned at the end, in [0, 1); default 0.5
            (``1 - n/m`` for ``"n:m"``, the only value allowed there).
        schedule: ``"cubic"`` (gradual) or ``"one_shot"``.
        initial_sparsity: sparsity at ``start_step`` of the cubic schedule, <= ``final_sparsity``.
        start_step: optimizer step of the first (or only) pruning; int, or float fraction of the run.
        end_step: optimizer step where the cubic schedule reaches ``final_sparsity``; int, or fraction.
        frequency: optimizer steps between two mask updates of the cubic schedule.
        scope: ``"layer"`` (each layer to the target) or ``"global"`` (one magnitude threshold over all
            targets; ``"unstructured"`` only).
        structured_dim: ``"outputs"`` (rows of ``nn.Linear``, neurons) or ``"inputs"`` (columns).
        pruning_norm: 1 or 2, the norm that ranks rows, columns and heads.
        n, m: the N:M pattern, ``1 <= n < m``.
        include, exclude: regular expression(s) searched in module names (``re.search``); with
            ``"heads"``, in the names of the attention modules (``transformer.h.0.attn``).
        prune_embeddings: also prune ``nn.Embedding`` weights (``"unstructured"`` only).
        make_permanent_at_end: call `make_permanent` in ``on_train_end``.
        verbose: print every mask update (rank zero).

    Raises:
        ConfigurationError: (a ``ValueError``) invalid arguments, all named in one message; in
            ``setup`` a sharded strategy or a module with ``peft`` adapters; in ``on_fit_start`` (and
            `prune_module`) a network with peft adapter layers, a pattern matching no module, nothing
            to prune, an N:M layer whose input size is not a multiple of ``m``, or masks in a
            checkpoint that do not fit the model.

    Example::

        import lightning as L
        from transformers import GPT2Config
        from lit_bigmodel import SFTModule
        from lit_bigmodel.callbacks import Pruning
        from lit_bigmodel.datamodules import ArithmeticDataModule

        # 50% of the Linear / Conv1D weights, reached gradually between 20% and 70% of the run
        pruning = Pruning("unstructured", final_sparsity=0.5, start_step=0.2, end_step=0.7, frequency=10)
        module = SFTModule(GPT2Config(n_layer=2, n_embd=128, n_head=4), learning_rate=2e-3)
        L.Trainer(max_steps=1000, callbacks=[pruning]).fit(module, ArithmeticDataModule())
        print(pruning.measure_sparsity()["global"])   # 0.5, counted from the weights
        module.export("out/pruned")                   # reloads with its zeros

        Pruning("n:m", n=2, m=4, start_step=0.5, end_step=0.8)   # 2:4, for sparse tensor cores
    """

    def __init__(
        self,
        method: Method = "unstructured",
        final_sparsity: float | None = None,
        schedule: PruningSchedule = "cubic",
        initial_sparsity: float = 0.0,
        start_step: int | float = 0,
        end_step: int | float = 0.75,
        frequency: int = 10,
        scope: Literal["layer", "global"] = "layer",
        structured_dim: Literal["outputs", "inputs"] = "outputs",
        pruning_norm: int = 1,
        n: int = 2,
        m: int = 4,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        prune_embeddings: bool = False,
        make_permanent_at_end: bool = True,
        verbose: bool = False,
    ) -> None:
        problems = []
        if method not in METHODS:
            problems.append(f"`method` must be one of {METHODS}, got {method!r}.")
        nm_ok = isinstance(n, int) and isinstance(m, int) and 1 <= n < m
        if method == "n:m" and not nm_ok:
            problems.append(
                f"`n` and `m` must be integers with 1 <= n < m (keep n of every m weights), got n={n!r}, m={m!r}."
            )
        if final_sparsity is None:
            final_sparsity = 1.0 - n / m if method == "n:m" and nm_ok else 0.5
        elif check_number("final_sparsity", final_sparsity, low=0.0, high=1.0, high_open=True) is not None:
            problems.append(f"`final_sparsity` must be in [0, 1), got {final_sparsity!r}.")
        elif method == "n:m" and nm_ok and abs(final_sparsity - (1.0 - n / m)) > 1e-9:
            problems.append(
                f"`final_sparsity` must be 1 - n/m = {1.0 - n / m} (or None) with method='n:m', got {final_sparsity!r}."
            )
        if check_number("initial_sparsity", initial_sparsity, low=0.0, high=1.0, high_open=True) is not None:
            problems.append(f"`initial_sparsity` must be in [0, 1), got {initial_sparsity!r}.")
        elif isinstance(final_sparsity, (int, float)) and initial_sparsity > final_sparsity:
            problems.append(
                f"`initial_sparsity` must be <= `final_sparsity` ({final_sparsity!r}), got {initial_sparsity!r}."
            )
        if schedule not in _SCHEDULES:
            problems.append(f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}.")
        for argument, value in (("start_step", start_step), ("end_step", end_step)):
            if not _is_step(value):
                problems.append(
                    f"`{argument}` must be an int >= 0 (optimizer steps) or a float in [0, 1] (fraction of the run), got {value!r}."
                )
        if (
            schedule == "cubic"
            and _is_step(start_step)
            and _is_step(end_step)
            and isinstance(start_step, float) == isinstance(end_step, float)
            and end_step <= start_step
        ):
            problems.append(f"`end_step` must be after `start_step` ({start_step!r}), got {end_step!r}.")
        if check_number("frequency", frequency, low=1, integer=True) is not None:
            problems.append(f"`frequency` must be an int >= 1 (optimizer steps), got {frequency!r}.")
        if scope not in _SCOPES:
            problems.append(f"`scope` must be one of {_SCOPES}, got {scope!r}.")
        elif scope == "global" and method != "unstructured":
            problems.append(f"`scope='global'` is only for method='unstructured', got method={method!r}.")
        if structured_dim not in _DIMS:
            problems.append(f"`structured_dim` must be one of {_DIMS}, got {structured_dim!r}.")
        if pruning_norm not in (1, 2):
            problems.append(f"`pruning_norm` must be 1 or 2, got {pruning_norm!r}.")
        if prune_embeddings and method != "unstructured":
            problems.append(f"`prune_embeddings=True` is only for method='unstructured', got method={method!r}.")
        self.include = check_patterns(include, "include", problems)
        self.exclude = check_patterns(exclude, "exclude", problems)
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.method = method
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.schedule = schedule
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency
        self.scope = scope
        self.structured_dim = structured_dim
        self.pruning_norm = pruning_norm
        self.n, self.m = n, m
        self.prune_embeddings = prune_embeddings
        self.make_permanent_at_end = make_permanent_at_end
        self.verbose = verbose

        self.masks: dict[str, torch.Tensor] = {}  # parameter name -> bool mask (True = kept), weight-shaped
        self.targets: list[Target] = []
        self._weights: dict[str, nn.Parameter] = {}
        self._heads: list[HeadLayer] = []
        self._steps: tuple[int, int] | None = None  # resolved (start, end)
        self._last_update: int | None = None  # schedule step of the last mask update
        self._last_seen: int | None = None  # global step last handled in on_train_batch_end
        self._permanent = False
        self._pending: dict[str, Any] | None = None  # state loaded before the targets exist
        self._hooks: list[Any] = []
        self._mask_at_batch_end = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method,
            final_sparsity=self.final_sparsity,
            schedule=self.schedule,
            include=self.include,
            exclude=self.exclude,
        )

    # ------------------------------------------------------------------ schedule
    def target_sparsity(self, step: int) -> float:
        """The scheduled sparsity after ``step`` optimizer steps (0 before ``start_step``); needs resolved steps."""
        start, end = self._resolved_steps()
        if self.schedule == "one_shot":
            return self.final_sparsity if step >= start else 0.0
        return cubic_sparsity(step, start, end, self.frequency, self.initial_sparsity, self.final_sparsity)

    def _schedule_point(self, step: int) -> int | None:
        """The latest mask-update step at or before ``step`` (None before the schedule starts)."""
        start, end = self._resolved_steps()
        if step < start:
            return None
        if self.schedule == "one_shot":
            return start
        return min(end, start + (step - start) // self.frequency * self.frequency)

    def _resolved_steps(self) -> tuple[int, int]:
        if self._steps is None:
            end = self.end_step if self.schedule == "cubic" else self.start_step
            if isinstance(self.start_step, float) or isinstance(end, float):
                raise RuntimeError("fractional `start_step` / `end_step` are resolved when fitting starts; ask later.")
            self._steps = (int(self.start_step), int(end))
        return self._steps

    def _resolve_steps(self, trainer: L.Trainer) -> None:
        total = trainer.estimated_stepping_batches

        def resolve(value: int | float, argument: str) -> int:
            if isinstance(value, int):
                return value
            if total == float("inf"):
                raise ConfigurationError(
                    f"`{argument}`={value!r} is a fraction of the run, but the run has no length; set `max_steps`."
                )
            return round(value * total)

        start = resolve(self.start_step, "start_step")
        end = resolve(self.end_step, "end_step") if self.schedule == "cubic" else start
        if self.schedule == "cubic" and end <= start:
            raise ConfigurationError(
                f"`end_step` must be after `start_step`; they resolve to steps {end} and {start} of a {total}-step run."
            )
        self._steps = (start, end)

    # ------------------------------------------------------------------ Trainer hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if is_sharded(trainer):
            raise ConfigurationError(
                f"Pruning does not support {type(trainer.strategy).__name__}: its parameters are sharded across ranks, so "
                "per-layer masks and magnitude ranks cannot be computed on one rank. Use strategy='ddp' or one device, "
                "then prune the exported model."
            )
        peft = getattr(pl_module, "peft", None)
        if peft is not None:
            raise ConfigurationError(f"Pruning: `peft` must be None, got {type(peft).__name__}: {_AFTER_MERGING}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve_steps(trainer)
        self._find_targets(pl_module)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        if self.masks:
            self._apply_masks()
        rank_zero_info(
            f"Pruning: {self.method} to {self.final_sparsity:.1%} ({self.schedule}, steps {self._steps}) of "
            f"{sum(t.weight.numel() for t in self.targets):,} weights in {len(self.targets)} tensors."
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        self._mask_at_batch_end = False
        for optimizer in trainer.optimizers:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            names = [t.name for t in self.targets if id(t.weight) in in_optimizer]
            if not hasattr(optimizer, "register_step_post_hook"):
                self._mask_at_batch_end = True
                continue
            self._hooks.append(optimizer.register_step_post_hook(self._make_post_step_hook(names)))
        self._last_seen = trainer.global_step
        self._update(trainer, pl_module, trainer.global_step, log=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_seen:
            return  # gradient accumulation: no optimizer step since the last call
        self._last_seen = step
        if self._mask_at_batch_end:
            self._apply_masks()
        updated = self._update(trainer, pl_module, step, log=True)
        if not updated and self.targets and step % max(1, getattr(trainer, "log_every_n_steps", 50)) == 0:
            self._log(pl_module, measure_sparsity(self.targets))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        if not self.targets:
            return
        sparsity = measure_sparsity(self.targets)
        rank_zero_info(f"Pruning: final sparsity {sparsity['global']:.2%} of the targeted weights (counted zeros).")
        if self.make_permanent_at_end:
            self.make_permanent()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: pack_mask(mask) for name, mask in self.masks.items()},
            "shapes": {name: list(mask.shape) for name, mask in self.masks.items()},
            "last_update": self._last_update,
            "permanent": self._permanent,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)  # matched to the weights in on_fit_start, once the model is built

    def _restore(self, state: dict[str, Any]) -> None:
        self._last_update = state.get("last_update")
        self._permanent = bool(state.get("permanent", False))
        masks, shapes = state.get("masks", {}), state.get("shapes", {})
        weights = self._weights
        problems = [f"{name!r} (not a pruning target now)" for name in masks if name not in weights]
        problems += [
            f"{name!r} (shape {tuple(shapes[name])} in the checkpoint, {tuple(weights[name].shape)} now)"
            for name in masks
            if name in weights and tuple(shapes[name]) != tuple(weights[name].shape)
        ]
        if problems:
            raise ConfigurationError(f"the checkpoint's pruning masks do not fit the model: {', '.join(problems)}.")
        self.masks = {
            name: unpack_mask(packed, shapes[name]).to(weights[name].device) for name, packed in masks.items()
        }

    # ------------------------------------------------------------------ public helpers
    @torch.no_grad()
    def make_permanent(self) -> None:
        """Zero the pruned weights one last time and drop the masks: later training may move them again."""
        self._apply_masks()
        self.masks = {}
        self._remove_hooks()
        self._permanent = True

    def measure_sparsity(self) -> dict[str, float]:
        """Fraction of exact zeros in each targeted weight (by module name) and ``"global"``, from the weights."""
        return measure_sparsity(self.targets)

    @torch.no_grad()
    def prune_module(self, module: nn.Module, sparsity: float | None = None) -> dict[str, float]:
        """Prune ``module`` once, outside any Trainer, to ``sparsity`` (default ``final_sparsity``).

        For inference and benchmarks: the weights are zeroed, no mask or hook is kept, and the
        callback's own state is untouched. Returns `measure_sparsity` of the pruned module.
        """
        sparsity = self.final_sparsity if sparsity is None else sparsity
        if not 0.0 <= sparsity < 1.0 or (self.method == "n:m" and sparsity > 1.0 - self.n / self.m):
            limit = f"[0, {1.0 - self.n / self.m}]" if self.method == "n:m" else "[0, 1)"
            raise ConfigurationError(f"`sparsity` must be in {limit}, got {sparsity!r}.")
        targets, heads = self._resolve_targets(module)
        masks = self._compute_masks(targets, heads, {}, sparsity)
        for target in targets:
            target.weight.mul_(masks[target.name])
        return measure_sparsity(targets)

    # ------------------------------------------------------------------ internals
    def _resolve_targets(self, module: nn.Module) -> tuple[list[Target], list[HeadLayer]]:
        adapted = _adapter_layers(module)
        if adapted:
            shown = ", ".join(adapted[:3]) + (f" and {len(adapted) - 3} more" if len(adapted) > 3 else "")
            raise ConfigurationError(f"Pruning: the network has peft adapter layers ({shown}): {_AFTER_MERGING}")
        targets, heads, problems = find_targets(module, self.method, self.include, self.exclude, self.prune_embeddings)
        if self.method == "n:m":
            problems += nm_problems(targets, self.m)
        if problems:
            raise ConfigurationError("Pruning: " + " ".join(problems))
        return targets, heads

    def _find_targets(self, pl_module: nn.Module) -> None:
        self.targets, self._heads = self._resolve_targets(pl_module)
        self._weights = {t.name: t.weight for t in self.targets}

    def _compute_masks(
        self, targets: list[Target], heads: list[HeadLayer], masks: dict[str, torch.Tensor], sparsity: float
    ) -> dict[str, torch.Tensor]:
        if self.method == "unstructured":
            return unstructured_masks(targets, masks, sparsity, self.scope)
        if self.method == "structured":
            return structured_masks(targets, masks, sparsity, self.structured_dim, self.pruning_norm)
        if self.method == "heads":
            return head_masks(targets, heads, masks, sparsity, self.pruning_norm)
        return nm_masks(targets, masks, sparsity, self.n, self.m)

    @torch.no_grad()
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, log: bool) -> bool:
        """Recompute the masks if ``step`` reached a schedule point not handled yet; True if it did."""
        point = self._schedule_point(step)
        if self._permanent or point is None or (self._last_update is not None and point <= self._last_update):
            return False
        sparsity = self.target_sparsity(point)
        self.masks = self._compute_masks(self.targets, self._heads, self.masks, sparsity)
        self._apply_masks()
        self._last_update = point
        measured = measure_sparsity(self.targets)
        if self.verbose:
            rank_zero_info(
                f"Pruning at step {step}: target {sparsity:.2%}, measured {measured['global']:.2%} (counted zeros)."
            )
        if log:
            self._log(pl_module, measured)
        return True

    def _log(self, pl_module: L.LightningModule, sparsity: dict[str, float]) -> None:
        pl_module.log("pruning/sparsity", sparsity["global"], on_step=True, on_epoch=False, rank_zero_only=True)
        for name, value in sparsity.items():
            if name != "global":
                pl_module.log(f"pruning/sparsity/{name}", value, on_step=True, on_epoch=False, rank_zero_only=True)

    @torch.no_grad()
    def _apply_masks(self, names: Sequence[str] | None = None) -> None:
        for name in self.masks if names is None else names:
            mask = self.masks.get(name)
            if mask is not None:
                self._weights[name].mul_(mask)

    def _make_post_step_hook(self, names: list[str]) -> Any:
        def remask(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._apply_masks(names)

        return remask

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


_AFTER_MERGING = (
    "the base weights under adapters are frozen, and the merged export adds the adapters' update to them "
    "(merged weight = pruned base + B·A), so its zeros would be lost. Prune after merging: export the merged "
    "model (`module.export(dir)`), then fine-tune SFTModule(dir) with Pruning and no `peft`."
)


def _adapter_layers(module: nn.Module) -> list[str]:
    """Names of the peft adapter layers (LoRA, DoRA, ...) in ``module``; none when peft was never imported."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]


def _is_step(value: Any) -> bool:
    """An int >= 0 (optimizer steps) or a finite float in [0, 1] (fraction of the run)."""
    if isinstance(value, float):
        return check_number("step", value, low=0.0, high=1.0) is None
    return check_number("step", value, low=0, integer=True) is None
