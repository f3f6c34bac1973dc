"""Callbacks for any `lightning.Trainer` (LR decay, early stopping, pruning, precision: see the open issues)."""

__all__: list[str] = []
