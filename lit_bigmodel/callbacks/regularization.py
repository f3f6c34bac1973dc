"""`L1L2`: an L1 / L2 penalty on chosen parameters, added to their gradients at each optimizer step, for any Trainer.

The penalty λ1·Σ|w| + λ2·Σw² is not put in the loss (a callback cannot change what ``training_step``
returns); its gradient λ1·sign(w) + 2·λ2·w is added to ``param.grad`` by an
``Optimizer.register_step_pre_hook``, inside ``optimizer.step()`` and after the closure Lightning passes
it (backward, gradient hooks, clipping) when there is one: once per optimizer step (never
per accumulated micro-batch), after Lightning's fp16 unscaling, the module's own gradient processing
(`SFTModule`'s per-token weighting) and gradient clipping, and never on a step that the fp16
``GradScaler`` skips. The result is the gradient of ``loss + penalty``, with the penalty unclipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from lit_bigmodel._checks import check_number, check_patterns
from lit_bigmodel._sharding import is_fsdp, is_fsdp2, zero_stage
from lit_bigmodel.callbacks._steps import torch_optimizer
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.optim import no_decay_parameters

__all__ = ["L1L2"]


class L1L2(Callback):
    """Add λ1·Σ|w| + λ2·Σw² over the chosen parameters to the training objective (through their gradients).

    Which parameters: the trainable parameters of the LightningModule whose name (``named_parameters``,
    every alias of a tied one) matches an ``include`` regular expression (``re.search``; all if None)
    and no ``exclude`` one; with ``exclude_no_decay=True`` (default) minus the biases, norms and
    embeddings of the package's no-decay rule (`lit_bigmodel.optim`). Resolved in ``on_fit_start``,
    after ``configure_model``; `targets` lists them.

    How: the penalty's gradient is added to ``param.grad`` inside ``optimizer.step()`` (a step pre-hook
    on each optimizer, for the parameters that optimizer updates): exactly once per optimizer step under
    gradient accumulation, in automatic and manual optimization (SeqGAN's two optimizers), after fp16
    unscaling (and multiplied by the scale when a fused optimizer unscales inside its step), after the
    module's gradient processing and after gradient clipping, so the penalty gradient itself is never
    clipped. A step whose gradients were all dropped (``PrecisionMonitor(policy="skip")``) or that the
    ``GradScaler`` skips gets no penalty either. Not for ``LBFGS``: its line search reads the closure's
    loss, which does not hold the penalty.

    Not weight decay: under Adam an L2 gradient 2·λ2·w is divided by √v like the loss gradient, so large
    weights with large gradients are barely shrunk; decoupled weight decay (``AdamW``,
    ``SFTModule(weight_decay=...)``) shrinks every weight by ``lr · weight_decay · w`` whatever its
    gradient. The two add up when both are on (a warning says so): for "L2 regularisation" under AdamW
    use ``weight_decay`` and leave ``l2=0``; use ``l2`` with SGD, to regularise the objective itself
    (its minimiser is the ridge solution), or with ``l1`` (elastic net).

    Distributed: under DDP the gradients are already averaged when the hook runs and the parameters are
    the same on every rank, so each rank adds the same penalty gradient. Under FSDP2
    (`fsdp2_strategy`) parameters and gradients are DTensor shards: each rank adds the penalty gradient
    of its own shard (exact, elementwise) and the logged value sums the local sums across the sharding
    ranks. DeepSpeed (every ZeRO stage keeps gradients in its own buffers, and ZeRO-3 holds empty
    partitions outside a forward) and FSDP1 (`fsdp_strategy`, flattened shards) are refused in ``setup``.

    Logs ``log_name`` (the penalty at the last optimizer step, the same on every rank) at each training
    batch; ``log_name=None`` logs nothing.

    Args:
        l1: λ1 >= 0, weight of Σ|w| (gradient λ1·sign(w); 0 at w = 0).
        l2: λ2 >= 0, weight of Σw² (gradient 2·λ2·w).
        include: regular expression(s) searched in parameter names; None: every trainable parameter.
        exclude: regular expression(s); matching parameters are left out.
        exclude_no_decay: leave out biases, norms and embeddings (`lit_bigmodel.optim.is_no_decay`).
        log_name: the metric the penalty is logged under, or None.

    Raises:
        ConfigurationError: (a ``ValueError``) invalid arguments, all named in one message; in ``setup`` a
            DeepSpeed or FSDP1 strategy; in ``on_fit_start`` an ``include`` / ``exclude`` pattern that
            matches no parameter name, or a selection that holds no trainable parameter.

    Example::

        import lightning as L
        from lit_bigmodel.callbacks.regularization import L1L2

        # L1 on the MLP weights of every block, L2 on every other weight; biases, norms, embeddings left out
        callbacks = [L1L2(l1=1e-5, include=r"\\.mlp\\."), L1L2(l2=1e-4, exclude=r"\\.mlp\\.", log_name="reg/l2")]
        L.Trainer(max_steps=1000, callbacks=callbacks)
    """

    def __init__(
        self,
        l1: float = 0.0,
        l2: float = 0.0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        exclude_no_decay: bool = True,
        log_name: str | None = "regularization/penalty",
    ) -> None:
        problems = [p for p in (check_number("l1", l1, low=0.0), check_number("l2", l2, low=0.0)) if p]
        self.include = check_patterns(include, "include", problems)
        self.exclude = check_patterns(exclude, "exclude", problems)
        if not isinstance(exclude_no_decay, bool):
            problems.append(f"`exclude_no_decay` must be True or False, got {exclude_no_decay!r}.")
        if log_name is not None and (not isinstance(log_name, str) or not log_name):
            problems.append(f"`log_name` must be a non-empty string or None, got {log_name!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.l1 = float(l1)
        self.l2 = float(l2)
        self.exclude_no_decay = exclude_no_decay
        self.log_name = log_name
        # per fit
        self.targets: list[str] = []  # names of the penalised parameters (first alias of a tied one)
        self._target_ids: set[int] = set()
        self._handles: list[RemovableHandle] = []
        self._penalties: dict[int, torch.Tensor] = {}  # id(optimizer) → the penalty at its last step

    # ------------------------------------------------------------------ selection
    def select(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The (name, parameter) pairs of ``module`` that this callback penalises (see the class docstring).

        Raises:
            ConfigurationError: a pattern that matches no parameter name, or nothing trainable selected.
        """
        aliases: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
            params[id(param)] = param
        names = [name for names in aliases.values() for name in names]
        problems = [
            f"`{argument}` pattern {pattern!r} matches no parameter name (names look like {names[:3]})."
            for argument, patterns in (("include", self.include), ("exclude", self.exclude))
            for pattern in patterns
            if not any(re.search(pattern, name) for name in names)
        ]
        if problems:
            raise ConfigurationError(" ".join(problems))
        exempt = no_decay_parameters([module]) if self.exclude_no_decay else set()

        def chosen(key: int) -> bool:
            found = aliases[key]
            included = not self.include or any(re.search(p, n) for p in self.include for n in found)
            excluded = any(re.search(p, n) for p in self.exclude for n in found)
            return included and not excluded and key not in exempt and params[key].requires_grad

        selected = [(aliases[key][0], params[key]) for key in aliases if chosen(key)]
        if not selected:
            raise ConfigurationError(
                f"L1L2 selects no trainable parameter: `include`={self.include}, `exclude`={self.exclude}, "
                f"`exclude_no_decay`={self.exclude_no_decay}."
            )
        return selected

    # ------------------------------------------------------------------ the penalty
    @torch.no_grad()
    def penalty(
        self, parameters: Iterable[torch.Tensor], add_gradients: bool = False, grad_scale: Any = None
    ) -> torch.Tensor:
        """λ1·Σ|w| + λ2·Σw² over ``parameters`` (float64, summed over FSDP2 shards: collective there).

        With ``add_gradients=True`` also adds λ1·sign(w) + 2·λ2·w (times ``grad_scale`` if given) to each
        gradient, creating a zero one where a parameter has none.

        Example::

            L1L2(l2=1e-4).penalty(model.parameters())   # tensor(…, dtype=torch.float64)
        """
        local_sums: dict[Any, list[torch.Tensor]] = {}  # how the sum must be reduced → per-parameter sums
        for param in parameters:
            weight = _local(param)
            if add_gradients:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                grad = _local(param.grad)
                step = weight.sign().mul_(self.l1) if self.l1 else torch.zeros_like(weight)
                if self.l2:
                    step.add_(weight, alpha=2.0 * self.l2)
                grad.add_(step.mul_(grad_scale.to(step)) if grad_scale is not None else step)
            value = weight.detach().double()
            term = value.abs().sum() * self.l1 + value.square().sum() * self.l2
            local_sums.setdefault(_shard_key(param), []).append(term)
        total = torch.zeros((), dtype=torch.float64)
        for key, terms in local_sums.items():
            part = torch.stack([t.to(terms[0].device) for t in terms]).sum()
            if key is not None:  # FSDP2: this rank's shards, summed over the ranks that shard them
                mesh, dims = key
                for dim in dims:
                    torch.distributed.all_reduce(part, group=mesh.get_group(dim))
            total = total.to(part.device) + part
        return total

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """Add the penalty now, or, when ``step`` got a closure (Lightning's backward and gradient hooks), after it."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:  # fp16 AMP's GradScaler, or a plain step(): the gradients are final here
            self._add_penalty(optimizer)
            return None

        def closure_then_penalty() -> Any:
            result = closure()
            self._add_penalty(optimizer)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_penalty}
        return (args[0], closure_then_penalty, *args[2:]), kwargs

    def _add_penalty(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not any(p.grad is not None for p in params):  # the step was dropped: it changes nothing, nor do we
            return
        # a fused optimizer under fp16 AMP unscales inside step(): GradScaler leaves it `grad_scale`
        scale = getattr(optimizer, "grad_scale", None)
        targets = [p for p in params if id(p) in self._target_ids]
        if targets:
            self._penalties[id(optimizer)] = self.penalty(targets, add_gradients=True, grad_scale=scale)

    # ------------------------------------------------------------------ training hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        stage_number = zero_stage(trainer)
        if stage_number is not None:
            raise ConfigurationError(
                f"L1L2 supports single-device, ddp and fsdp2_strategy() training, got DeepSpeed ZeRO stage "
                f"{stage_number}: DeepSpeed keeps gradients in its own partitioned buffers (and ZeRO-3 holds "
                "empty parameter partitions outside a forward), so the penalty would be lost or summed as zero."
            )
        if is_fsdp(trainer) and not is_fsdp2(trainer):
            raise ConfigurationError(
                "L1L2 supports single-device, ddp and fsdp2_strategy() training, got FSDPStrategy (FSDP1): its "
                "flattened shards do not keep parameter names and shapes; use fsdp2_strategy()."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        selected = self.select(pl_module)
        self.targets = [name for name, _ in selected]
        self._target_ids = {id(p) for _, p in selected}
        self._remove_hooks()
        if not (self.l1 or self.l2):
            return
        doubled = []
        for optimizer in trainer.optimizers:
            inner = torch_optimizer(optimizer)
            if inner is None:
                raise ConfigurationError(
                    f"L1L2 needs torch optimizers, got {type(optimizer).__name__}, which does not wrap one."
                )
            self._handles.append(inner.register_step_pre_hook(self._pre_step))
            doubled += [g["weight_decay"] for g in inner.param_groups if g.get("weight_decay") and self._in(g)]
        if self.l2 and doubled:
            rank_zero_warn(
                f"L1L2(l2={self.l2}) and the optimizer's weight_decay={doubled[0]} both shrink the same parameters: "
                "set one of them to 0 (`weight_decay` is decoupled decay, `l2` a gradient that Adam normalises)."
            )
        rank_zero_info(f"L1L2(l1={self.l1}, l2={self.l2}) on {len(self.targets)} parameters.")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log_name is not None and self._penalties:
            value = torch.stack([v.to(pl_module.device) for v in self._penalties.values()]).sum().float()
            pl_module.log(self.log_name, value, on_step=True, on_epoch=False, batch_size=1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _in(self, group: dict[str, Any]) -> bool:
        return any(id(p) in self._target_ids for p in group["params"])

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._penalties = {}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: the local shard of a DTensor (a view: in-place changes reach it), else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_key(param: torch.Tensor) -> Any:
    """None for a whole tensor; for a DTensor, its mesh and the mesh dimensions it is sharded over."""
    if not isinstance(param, DTensor):
        return None
    dims = tuple(i for i, placement in enumerate(param.placements) if placement.is_shard())
    return (param.device_mesh, dims) if dims else None
