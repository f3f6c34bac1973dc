"""Metrics that torchmetrics does not have."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.text import BLEUScore


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


class HeldOutBLEU(BLEUScore):
    """Corpus BLEU of generated texts, every one scored against the same held-out references.

    The figure of torchmetrics' `BLEUScore` given all ``references`` as the targets of every
    prediction (SeqGAN's real-text BLEU), with the references' n-gram counts merged once instead
    of once per prediction. Texts are whitespace-tokenized, as `BLEUScore` does.

    Example::

        bleu = HeldOutBLEU(["to be or not to be", "the rest is silence"], n_gram=2)
        bleu.update(["to be or not"]); bleu.compute()
    """

    def __init__(self, references: Sequence[str], n_gram: int = 4, smooth: bool = False, **kwargs: Any) -> None:
        super().__init__(n_gram=n_gram, smooth=smooth, **kwargs)
        tokenized = [reference.split() for reference in references]
        if not tokenized:
            raise ValueError("`references` must hold at least one text, got none.")
        self._reference_counts: Counter[tuple[str, ...]] = Counter()
        for tokens in tokenized:
            self._reference_counts |= _ngram_counts(tokens, n_gram)
        lengths = [len(tokens) for tokens in tokenized]
        # the reference length BLEUScore pairs with a prediction of each length: the first closest one
        self._closest = [min(lengths, key=_distance_to(p)) for p in range(max(lengths) + 1)]

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]] | None = None) -> None:  # type: ignore[override]
        """Add ``preds`` (generated texts); the references are the ones given at construction."""
        if target is not None:
            raise ValueError("`target` must be None: HeldOutBLEU scores against the references given at construction.")
        matched, total = [0] * self.n_gram, [0] * self.n_gram
        preds_len = target_len = 0
        for pred in preds:
            tokens = pred.split()
            preds_len += len(tokens)
            target_len += self._closest[min(len(tokens), len(self._closest) - 1)]
            counts = _ngram_counts(tokens, self.n_gram)
            for ngram, count in (counts & self._reference_counts).items():
                matched[len(ngram) - 1] += count
            for ngram, count in counts.items():
                total[len(ngram) - 1] += count
        self.numerator += torch.tensor(matched, dtype=self.numerator.dtype, device=self.numerator.device)
        self.denominator += torch.tensor(total, dtype=self.denominator.dtype, device=self.denominator.device)
        self.preds_len += preds_len
        self.target_len += target_len


def _ngram_counts(tokens: Sequence[str], n_gram: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, n_gram + 1):
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return counts


def _distance_to(target: int) -> Callable[[int], int]:
    return lambda length: abs(length - target)
