"""Callbacks for any `lightning.Trainer`: learning-rate decay, early stopping with restore, precision guard, pruning,
L1 / L2 penalties."""

from lit_bigmodel.callbacks.early_stopping import EarlyStopping
from lit_bigmodel.callbacks.lr_decay import LRDecay
from lit_bigmodel.callbacks.precision import PrecisionChoice, PrecisionMonitor, auto_precision
from lit_bigmodel.callbacks.pruning import Pruning, to_semi_structured
from lit_bigmodel.callbacks.regularization import L1L2

__all__ = [
    "L1L2",
    "EarlyStopping",
    "LRDecay",
    "PrecisionChoice",
    "PrecisionMonitor",
    "Pruning",
    "auto_precision",
    "to_semi_structured",
]
