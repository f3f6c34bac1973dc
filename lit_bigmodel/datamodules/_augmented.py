"""The training split of a datamodule with ``augment``: each example as it is, then its augmented copies of the epoch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

MakeCopy = Callable[[dict[str, Any], int, int], dict[str, Any]]
"""``(tokenized example, epoch, copy number >= 1)`` → the tokenized augmented copy."""


class AugmentedSplit(Dataset[dict[str, Any]]):
    """``len(examples) * (1 + copies)`` items per epoch: item ``i`` is copy ``i % (1 + copies)`` of example ``i // (1 + copies)``.

    Copy 0 is the example itself; the others come from ``make_copy(example, epoch, copy)``, built
    when they are loaded. Items are indexed by ``(epoch, i)`` (the sampler of ``build_loader(...,
    tag_epoch=True)`` yields them), so worker processes know the epoch without shared state.
    """

    def __init__(self, examples: list[dict[str, Any]], copies: int, make_copy: MakeCopy) -> None:
        self.examples = examples
        self.copies = copies
        self.make_copy = make_copy

    def __len__(self) -> int:
        return len(self.examples) * (1 + self.copies)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        example, copy_number = self.examples[i // (1 + self.copies)], i % (1 + self.copies)
        return example if copy_number == 0 else self.make_copy(example, epoch, copy_number)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        owner = getattr(self.make_copy, "__self__", None)
        if owner is not None and getattr(owner, "trainer", None) is not None:
            # a worker process started by spawning receives the datamodule without its trainer
            detached = copy.copy(owner)
            detached.trainer = None
            state["make_copy"] = getattr(detached, self.make_copy.__name__)
        return state
