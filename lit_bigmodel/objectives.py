"""Training objectives: what a module's training step minimises, as one small component.

A module calls its objective (``terms = step(model_inputs, batch)``, the step being
``objective.bind(module)``, compiled when the module's ``compile`` says so) and never needs to know
which loss it is. An objective returns `LossTerms`: the loss SUMMED over the batch's units
(labelled tokens for a causal LM, examples for a classifier) and how many units that is, so the
module can weight gradient accumulation and data-parallel ranks by units, not by micro-batches.

- `CausalLMObjective`: next-token cross-entropy on the labelled tokens; with ``chunked=True`` it
  is computed from the final hidden states and the LM head in chunks (`chunked_causal_lm_loss`),
  never holding the ``(B, T, V)`` logits.
- `ClassificationObjective`: cross-entropy per example.
- `DistillationObjective`: composes a hard-label objective with the distillation (KD),
  hidden-state and attention-map terms of a teacher.

A custom loss is an `Objective` subclass that implements `Objective.from_logits` (and, if it needs
more than the logits, `Objective.bind`), passed as ``SFTModule(..., objective=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor

from lit_bigmodel._checks import check_number
from lit_bigmodel._sharding import is_fsdp2, zero_stage
from lit_bigmodel.datamodules.packing import packed_attention_inputs
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.losses import (
    IGNORE_INDEX,
    attention_loss,
    causal_lm_loss,
    chunked_causal_lm_loss,
    distillation_loss,
    hidden_state_loss,
)

# config fields of causal LMs that transform the logits after the LM head (the chunked loss would skip them)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LossTerms(NamedTuple):
    """One batch's loss as a sum over its units, so that batches of different sizes can be weighted by units.

    Attributes:
        total: scalar, differentiable: the per-unit loss summed over the batch's units.
        units: scalar integer tensor: how many units ``total`` sums over (labelled tokens, or examples).
        logs: named per-batch means to log beside the loss (``"train/distill_loss"``, ...), detached.
    """

    total: torch.Tensor
    units: torch.Tensor
    logs: dict[str, torch.Tensor]

    @property
    def mean(self) -> torch.Tensor:
        """The batch's mean loss per unit (0 when it has no unit)."""
        return self.total / self.units.clamp(min=1)


Step = Callable[[dict[str, Any], dict[str, torch.Tensor]], LossTerms]  # (model inputs, batch) -> LossTerms


class Objective:
    """A training objective. Subclasses implement `from_logits`; `bind` may use more than the logits.

    Example::

        class LabelSmoothed(CausalLMObjective):
            def from_logits(self, logits, batch):
                labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
                per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="none",
                                            label_smoothing=0.1)
                return LossTerms(per_token.sum(), (labels != IGNORE_INDEX).sum(), {})

        SFTModule(config, objective=LabelSmoothed())
    """

    def from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossTerms:
        """The loss of the network's ``logits`` for ``batch``; also what validation reports as ``val/loss``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `from_logits`.")

    def bind(self, module: Any) -> Step:
        """The training step's computation ``(model inputs, batch) -> LossTerms`` for ``module``'s built network.

        Called once the network exists (again if it is replaced); the module may ``torch.compile`` the result.
        """
        network = module.model

        def step(inputs: dict[str, Any], batch: dict[str, torch.Tensor]) -> LossTerms:
            return self.from_logits(network(**inputs).logits, batch)

        return step


class CausalLMObjective(Objective):
    """Mean next-token cross-entropy over the labelled tokens (labels -100 elsewhere, e.g. prompts).

    Args:
        chunked: compute the training loss from the final hidden states and the LM head in chunks of
            ``chunk_size`` tokens (`chunked_causal_lm_loss`: same value and gradients, no ``(B, T, V)``
            logits). It steps aside, with one info line, when a subclass overrides `from_logits`, under
            ZeRO-3 / FSDP2 (the head's weight is a shard outside its forward) and for networks whose
            logits are not ``head(base_model(...))``.
        chunk_size: tokens per chunk (memory ∝ chunk × vocabulary).

    Example::

        SFTModule(config, objective=CausalLMObjective(chunk_size=2048))
    """

    def __init__(self, chunked: bool = True, chunk_size: int = 4096) -> None:
        problem = check_number("chunk_size", chunk_size, low=1, integer=True)
        if problem is not None:
            raise ConfigurationError(problem)
        self.chunked = chunked
        self.chunk_size = chunk_size

    def from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossTerms:
        mean, count = causal_lm_loss(logits, batch["labels"])
        return LossTerms(mean * count, count, {})

    def bind(self, module: Any) -> Step:
        parts = self._chunked_parts(module)
        if parts is None:
            return super().bind(module)
        body, head = parts
        chunk_size = self.chunk_size

        # `use_cache` stays the model's default: with use_cache=False and no attention mask, transformers 5
        # checks the position ids for packed sequences, which under torch.compile builds a (B, 1, T, T) mask
        # and so gives up SDPA's flash kernel (is_causal=True).
        def step(inputs: dict[str, Any], batch: dict[str, torch.Tensor]) -> LossTerms:
            hidden = body(**inputs).last_hidden_state  # (B, T, D)
            mean, count = chunked_causal_lm_loss(hidden, head.weight, batch["labels"], chunk_size)
            return LossTerms(mean * count, count, {})

        return step

    def _chunked_parts(self, module: Any) -> tuple[nn.Module, nn.Linear] | None:
        """``(body, head)`` when the chunked loss applies to this objective and network, else None (said once)."""
        if not self.chunked:
            return None
        if type(self).from_logits is not CausalLMObjective.from_logits:
            rank_zero_info(f"{type(self).__name__} overrides `from_logits`: training uses the full logits.")
            return None
        trainer = getattr(module, "_trainer", None)
        if zero_stage(trainer) == 3 or is_fsdp2(trainer):
            rank_zero_info("`chunked_loss` falls back to the full-logits loss under ZeRO-3 / FSDP2.")
            return None
        parts = _body_and_head(module.model)
        if isinstance(parts, str):
            rank_zero_info(f"`chunked_loss` falls back to the full-logits loss: {parts}.")
            return None
        return parts


class ClassificationObjective(Objective):
    """Cross-entropy of ``(B, C)`` logits against ``batch["labels"]`` ``(B,)``; every example is one unit.

    Example::

        SFTModule(bert_config, task="sequence_classification", objective=ClassificationObjective())
    """

    def from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossTerms:
        labels = batch["labels"]  # (B,)
        total = F.cross_entropy(logits.float(), labels, reduction="sum")
        return LossTerms(total, torch.tensor(labels.numel(), device=labels.device), {})


class DistillationObjective(Objective):
    """``alpha · hard + (1 − alpha) · KD + hidden_weight · hidden + attention_weight · attention``.

    ``hard`` is any objective of the student's logits (`CausalLMObjective`, `ClassificationObjective`,
    a custom one); KD is `distillation_loss` between the student's and the teacher's predictions on
    the same units (completion tokens for a causal LM, examples for a classifier). The hidden-state
    and attention-map terms are per-batch means over their positions, weighted by the batch's units.
    Batches marked ``batch["on_policy"] = True`` (the student's own samples) drop the hard term.
    `bind` reads the module's ``model`` (student), ``teacher`` (None: ``batch`` carries the
    teacher's cached top-k logits) and ``projections`` (student → teacher width, by student layer).

    Args:
        hard: the hard-label objective.
        alpha: weight of the hard term, in [0, 1].
        temperature, loss, beta, top_k: of `distillation_loss`.
        hidden_layer_map: student layer → teacher layer (0 = embeddings) whose hidden states are matched.
        hidden_loss: ``"mse"`` or ``"cosine"``.
        attention_layer_map: student layer → teacher layer (1-based) whose attention maps are matched.

    Example::

        objective = DistillationObjective(CausalLMObjective(chunked=False), alpha=0.5, temperature=2.0)
    """

    def __init__(
        self,
        hard: Objective,
        alpha: float = 0.5,
        temperature: float = 2.0,
        loss: str = "forward_kl",
        beta: float = 0.5,
        top_k: int | None = None,
        hidden_layer_map: Mapping[int, int] | None = None,
        hidden_loss: str = "mse",
        hidden_weight: float = 1.0,
        attention_layer_map: Mapping[int, int] | None = None,
        attention_weight: float = 1.0,
    ) -> None:
        self.hard = hard
        self.alpha = alpha
        self.temperature = temperature
        self.loss = loss
        self.beta = beta
        self.top_k = top_k
        self.hidden_layer_map = {int(k): int(v) for k, v in (hidden_layer_map or {}).items()}
        self.hidden_loss = hidden_loss
        self.hidden_weight = hidden_weight if self.hidden_layer_map else 0.0
        self.attention_layer_map = {int(k): int(v) for k, v in (attention_layer_map or {}).items()}
        self.attention_weight = attention_weight if self.attention_layer_map else 0.0

    def from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossTerms:
        return self.hard.from_logits(logits, batch)

    def bind(self, module: Any) -> Step:
        student_net, teacher_net, projections = module.model, module.teacher, module.projections
        want_hidden, want_attention = self.hidden_weight > 0, self.attention_weight > 0

        def step(inputs: dict[str, Any], batch: dict[str, torch.Tensor]) -> LossTerms:
            student = student_net(**inputs, output_hidden_states=want_hidden, output_attentions=want_attention)
            if teacher_net is None:
                if "teacher_topk_values" not in batch:
                    raise ConfigurationError(
                        "teacher=None needs batches with cached teacher logits: wrap the datamodule in "
                        "TeacherLogitsDataModule."
                    )
                t_logits, t_indices, teacher = batch["teacher_topk_values"], batch["teacher_topk_indices"], None
            else:
                teacher_inputs = inputs
                if "document_ids" in batch:  # packed rows: the mask in the form the teacher's attention takes
                    teacher_inputs = {
                        **inputs,
                        **packed_attention_inputs(batch["document_ids"], batch["position_ids"], teacher_net),
                    }
                with torch.no_grad():
                    teacher = teacher_net(
                        **teacher_inputs, output_hidden_states=want_hidden, output_attentions=want_attention
                    )
                t_logits, t_indices = teacher.logits, None
            labels = batch["labels"]
            if labels.dim() == 2:  # causal LM: position t predicts token t + 1, scored where that is labelled
                mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
                s_logits, t_logits = student.logits[:, :-1], t_logits[:, :-1]
                t_indices = t_indices[:, :-1] if t_indices is not None else None
                count = mask.sum()
                token_mask = labels != IGNORE_INDEX  # (B, T): the completion tokens' hidden states
            else:  # classification: (B,) labels, every example counts
                mask, s_logits = None, student.logits
                count = torch.tensor(labels.numel(), device=labels.device)
                token_mask = batch["attention_mask"].bool()
            soft = distillation_loss(
                s_logits, t_logits, self.loss, self.temperature, self.beta, mask, self.top_k, t_indices
            )  # fmt: skip
            alpha = 0.0 if batch.get("on_policy", False) else self.alpha  # sampled completions have no ground truth
            total = (1 - alpha) * soft * count
            logs = {"train/distill_loss": soft.detach()}
            if alpha > 0:
                hard = self.hard.from_logits(student.logits, batch)
                total = total + alpha * hard.total
                logs["train/hard_loss"] = hard.mean.detach()
            if want_hidden:
                assert teacher is not None  # configure_model refuses layer maps without the teacher
                hidden = torch.stack(
                    [
                        hidden_state_loss(
                            projections[str(s)](student.hidden_states[s]),
                            teacher.hidden_states[t],
                            self.hidden_loss,
                            token_mask,
                        )
                        for s, t in self.hidden_layer_map.items()
                    ]
                ).sum()
                total = total + self.hidden_weight * hidden * count
                logs["train/hidden_loss"] = hidden.detach()
            if want_attention:
                assert teacher is not None
                query_mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
                attention = torch.stack(
                    [
                        attention_loss(student.attentions[s - 1], teacher.attentions[t - 1], query_mask)
                        for s, t in self.attention_layer_map.items()
                    ]
                ).sum()
                total = total + self.attention_weight * attention * count
                logs["train/attention_loss"] = attention.detach()
            return LossTerms(total, count, logs)

        return step


def _body_and_head(model: Any) -> tuple[nn.Module, nn.Linear] | str:
    """The network's body (hidden states) and bias-free linear LM head, or why the chunked loss cannot use them.

    Hugging Face causal LMs compute ``logits = get_output_embeddings()(base_model(...).last_hidden_state)``
    (GPT-2 with its tied embedding, Llama with its own head, ...). Models that transform the logits
    afterwards are recognised from their config and, where the weights are materialised, by
    comparing both ways on a few tokens once.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return f"{type(model).__name__} has no bias-free nn.Linear LM head (get_output_embeddings)"
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        return f"{type(model).__name__} has no base model separate from its LM head"
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            return f"its config sets `{name}`={value!r}, a transform of the logits after the head"
    if getattr(head.weight, "ds_id", None) is not None:
        return "DeepSpeed ZeRO-3 partitions the LM head's weight outside the head's forward"
    reason = _check_head_and_body(model, body, head)
    return reason if reason is not None else (body, head)


@torch.no_grad()
def _check_head_and_body(model: Any, body: nn.Module, head: nn.Linear) -> str | None:
    """None if ``head(body(x))`` equals ``model(x).logits`` on a few tokens (or cannot be checked here)."""
    weight = head.weight
    if weight.is_meta or weight.numel() == 0 or type(weight) is not nn.Parameter:
        return None  # not materialised here (meta / sharded): the structure has to do
    input_ids = (torch.arange(8, device=weight.device) % head.out_features)[None]  # (1, 8)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()  # no dropout, so both ways compute the same function
    try:
        expected = model(input_ids=input_ids).logits  # (1, 8, V)
        got = head(body(input_ids=input_ids).last_hidden_state)
    except Exception as err:  # any network that does not follow the pattern
        return f"calling its base model and head separately failed ({type(err).__name__}: {err})"
    finally:
        for module, training in modes:
            module.training = training
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3):
        return "its logits are not head(base_model(...)) (checked on a few tokens)"
    return None


class UnitWeighting:
    """Weights accumulated micro-batches and data-parallel ranks by their units (tokens / examples).

    The back-propagated loss has the value of each batch's mean but the gradient of its unit SUM
    divided by a constant; before the optimizer step (`scale_gradients`, from the module's
    ``on_before_optimizer_step``: after fp16 unscaling, before clipping) the gradients are
    multiplied by ``accumulate_grad_batches × world_size × constant / units of the step on all
    ranks``, which gives the gradient of one batch holding every micro-batch of every rank. Lightning
    divides each micro-batch's loss by ``accumulate_grad_batches`` and DDP / FSDP / FSDP2 average the
    gradients over ranks, hence that factor. The constant is the previous step's units per
    micro-batch (the same on every rank) as a power of two, so gradients keep about the size of a
    mean loss and the result is bit for bit the same whatever the constant. Under DeepSpeed
    (which accumulates and owns the gradients) and in manual optimization each micro-batch's loss is
    its own mean, said once.

    Example::

        weighting = UnitWeighting()
        loss = weighting.loss(terms, terms.mean, trainer)        # in training_step
        weighting.scale_gradients(trainer, module.parameters())  # in on_before_optimizer_step
    """

    def __init__(self) -> None:
        self.enabled: bool | None = None  # decided at the first training step of a fit
        self.window_units: torch.Tensor | None = None  # units of this optimizer step on this rank
        self.divisor: torch.Tensor | float = 1.0

    def loss(self, terms: LossTerms, mean: torch.Tensor, trainer: Any, automatic: bool = True) -> torch.Tensor:
        """The loss to back-propagate: the value of ``mean``, the gradient of ``terms.total / divisor``."""
        if self.enabled is None:
            self.enabled = zero_stage(trainer) is None and automatic
            if not self.enabled:
                rank_zero_info(
                    "Under DeepSpeed (or manual optimization) each micro-batch's loss is its own mean: "
                    "accumulated micro-batches and ranks are weighted alike, not by their tokens / examples."
                )
        if not self.enabled:
            return mean
        units = terms.units.detach().float()
        self.window_units = units if self.window_units is None else self.window_units + units
        scaled = terms.total / self.divisor
        return mean.detach() + (scaled - scaled.detach())

    def scale_gradients(self, trainer: Any, parameters: Iterable[nn.Parameter]) -> None:
        """Divide the gradients by the units of this optimizer step, every micro-batch and rank together."""
        units = self.window_units
        if units is None:
            return
        self.window_units = None
        units = trainer.strategy.reduce(units, reduce_op="sum")  # one all-reduce of a scalar, no host sync
        replicas = trainer.accumulate_grad_batches * trainer.world_size
        _scale_gradients(parameters, self.divisor * replicas / units.clamp(min=1))
        # The next step's: units per micro-batch (alike on all ranks) rounded to a power of two, by which
        # dividing and multiplying back are exact, so the weights do not depend on it (resume needs no state).
        self.divisor = torch.exp2(torch.log2((units / replicas).clamp(min=1)).round())


@torch.no_grad()
def _scale_gradients(parameters: Iterable[nn.Parameter], scale: torch.Tensor) -> None:
    """Multiply every gradient by the device scalar ``scale`` in place (local shards of DTensor gradients)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        local = grad.to_local() if isinstance(grad, DTensor) else grad  # FSDP2: a view of this rank's shard
        by_device.setdefault(local.device, []).append(local)
    for device, grads in by_device.items():
        torch._foreach_mul_(grads, scale.to(device, non_blocking=True))
