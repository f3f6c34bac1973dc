"""Metrics that torchmetrics does not have."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import Metric


class NLLOracle(Metric):
    """SeqGAN's NLL-oracle: the oracle's mean per-token negative log-likelihood of generated sequences.

    ``update(samples)`` with ``(B, T)`` token ids; ``compute()`` is the mean over all sequences of
    each sequence's per-token mean −log p_oracle(y_t | y_<t) (the scale of the paper's Table 1).
    Summed across processes like any torchmetrics metric.

    Example::

        metric = NLLOracle(LSTMGenerator.oracle("seqgan_oracle_lstm.npz"))
        metric.update(generator.sample(1000)); metric.compute()     # e.g. tensor(9.04)
    """

    total: torch.Tensor
    count: torch.Tensor
    full_state_update = False
    higher_is_better = False

    def __init__(self, oracle: nn.Module, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.oracle: Any = oracle
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: torch.Tensor) -> None:
        with torch.no_grad():
            nll = self.oracle.sequence_nll(samples)  # type: ignore[operator]
        self.total += nll.double().sum()
        self.count += nll.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()
