"""`EvaluationMetrics`: the validation and test metrics of `SFTModule` (torchmetrics), one set per stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.losses import IGNORE_INDEX
from lit_bigmodel.objectives import LossTerms


class EvaluationMetrics(nn.Module):
    """Loss, token accuracy and exact match (causal LM) or loss, accuracy and macro F1 (classifier), by stage.

    A submodule of the LightningModule, so the metrics move with it and torchmetrics reduces them
    across ranks. ``update`` once per evaluation batch, ``compute`` once per epoch (it resets).

    Args:
        task: ``"causal_lm"`` or ``"sequence_classification"``.
        num_labels: the number of classes (classification only).
        stages: the stages that get their own metrics.

    Example::

        metrics = EvaluationMetrics("causal_lm")
        metrics.update("val", logits, batch, objective.from_logits(logits, batch))
        metrics.compute("val")   # {"val/loss": ..., "val/perplexity": ..., "val/token_accuracy": ...}
    """

    def __init__(self, task: str, num_labels: int | None = None, stages: Sequence[str] = ("val", "test")) -> None:
        super().__init__()
        if task == "sequence_classification" and num_labels is None:
            raise ConfigurationError("`num_labels` is required for sequence classification metrics, got None.")
        self.task = task
        self.stages = nn.ModuleDict({stage: nn.ModuleDict(self._new_metrics(task, num_labels)) for stage in stages})

    @staticmethod
    def _new_metrics(task: str, num_labels: int | None) -> dict[str, Metric]:
        if task == "causal_lm":
            return {"loss": MeanMetric(), "token_accuracy": MeanMetric(), "exact_match": MeanMetric()}
        assert num_labels is not None
        return {
            "loss": MeanMetric(),
            "accuracy": MulticlassAccuracy(num_classes=num_labels, average="micro"),  # the fraction correct
            "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
        }

    def of(self, stage: str) -> dict[str, Metric]:
        """The metrics of ``stage``, by name."""
        return {name: cast(Metric, metric) for name, metric in cast(nn.ModuleDict, self.stages[stage]).items()}

    def update(
        self,
        stage: str,
        logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        terms: LossTerms,
        exact_match: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: its logits, the objective's `LossTerms` and, optionally, per-example exact matches."""
        metrics = self.of(stage)
        metrics["loss"].update(terms.mean, weight=terms.units)
        if self.task == "causal_lm":
            labels = batch["labels"][:, 1:]  # (B, T-1)
            labelled = labels != IGNORE_INDEX
            correct = logits[:, :-1].argmax(-1) == labels
            metrics["token_accuracy"].update(correct[labelled].float())
            if exact_match is not None:
                metrics["exact_match"].update(exact_match.float())
        else:
            metrics["accuracy"].update(logits, batch["labels"])
            metrics["f1"].update(logits, batch["labels"])

    def compute(self, stage: str) -> dict[str, torch.Tensor]:
        """``{"{stage}/{name}": value}`` of the metrics that saw a batch (plus perplexity), then reset them."""
        metrics = self.of(stage)
        values = {f"{stage}/{name}": metric.compute() for name, metric in metrics.items() if metric.update_count}
        if self.task == "causal_lm" and f"{stage}/loss" in values:
            values[f"{stage}/perplexity"] = torch.exp(values[f"{stage}/loss"])
        for metric in metrics.values():
            metric.reset()
        return values


def exact_match(generated: torch.Tensor, completion_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Per example: is the generation the reference completion followed by EOS? ``(B,)`` bool.

    Args:
        generated: ``(B, N)`` new tokens (prompt removed), N ≥ 0.
        completion_ids: ``(B, C)`` reference completions without EOS, padded with -100.
        eos_token_id: the EOS id (None: the generation must hold exactly the completion's tokens).

    Example::

        exact_match(torch.tensor([[5, 6, 2]]), torch.tensor([[5, 6]]), eos_token_id=2)   # tensor([True])
    """
    width = completion_ids.shape[1] + 1  # the answer, then EOS
    generated = generated[:, :width]
    if generated.shape[1] < width:
        fill = eos_token_id if eos_token_id is not None else IGNORE_INDEX
        generated = torch.cat([generated, generated.new_full((len(generated), width - generated.shape[1]), fill)], 1)
    if eos_token_id is not None:
        ended = (generated == eos_token_id).cumsum(dim=1) > 0  # EOS and everything after it
        generated = generated.masked_fill(ended, IGNORE_INDEX)
    padded_target = F.pad(completion_ids, (0, 1), value=IGNORE_INDEX)  # (B, width)
    return (generated == padded_target).all(dim=1)
