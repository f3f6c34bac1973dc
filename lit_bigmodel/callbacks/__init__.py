"""Callbacks for any `lightning.Trainer`: learning-rate decay, early stopping with restore, precision guard, pruning."""

from lit_bigmodel.callbacks.early_stopping import EarlyStopping
from lit_bigmodel.callbacks.lr_decay import LRDecay
from lit_bigmodel.callbacks.precision import PrecisionChoice, PrecisionMonitor, auto_precision
from lit_bigmodel.callbacks.pruning import Pruning, to_semi_structured

__all__ = [
    "EarlyStopping",
    "LRDecay",
    "PrecisionChoice",
    "PrecisionMonitor",
    "Pruning",
    "auto_precision",
    "to_semi_structured",
]
