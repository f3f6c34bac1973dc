"""Random states of torch (CPU, CUDA), Python and NumPy, saved in checkpoints for exact resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """All random states, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class PendingRandomState:
    """Random states in a module's checkpoint, put back at the first training batch after a resume.

    Restored at the first batch, not at load time: creating the data iterator in between draws random
    numbers. A module calls `save` in ``on_save_checkpoint``, `load` in ``on_load_checkpoint`` and
    `restore` in ``on_train_batch_start``.

    Example::

        self._random_state = PendingRandomState()
        def on_train_batch_start(self, batch, batch_idx):
            self._random_state.restore()
    """

    key = "lit_bigmodel_rng_states"

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def save(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.key] = rng_states()

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.pending = checkpoint.get(self.key)

    def restore(self) -> None:
        if self.pending is not None:
            restore_rng_states(self.pending)
            self.pending = None
