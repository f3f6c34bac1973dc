"""Callbacks for any `lightning.Trainer`: learning-rate decay, early stopping with restore, precision guard, pruning."""

from lit_bigmodel.callbacks.early_stopping import EarlyStopping
from lit_bigmodel.callbacks.lr_decay import LRDecay
from lit_bigmodel.callbacks.precision import PrecisionChoice, PrecisionMonitor, auto_precision

# pruning: `from lit_bigmodel.callbacks.pruning import ...` is added here by the pruning work (issue on ModelPruning)

__all__ = ["EarlyStopping", "LRDecay", "PrecisionChoice", "PrecisionMonitor", "auto_precision"]
