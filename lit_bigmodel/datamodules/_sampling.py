"""Data loaders that resume exactly in the middle of an epoch, on one process or many."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """A `DistributedSampler` (seeded, reshuffled by ``set_epoch``) that can skip the start of an epoch.

    Lightning leaves a `DistributedSampler` in place and calls ``set_epoch`` on it, so the order of
    every epoch depends only on ``seed`` and the epoch number; after a mid-epoch resume ``skip``
    drops the samples the interrupted run had already consumed, once. With ``tag_epoch`` it yields
    ``(epoch, index)`` pairs, so that a dataset can vary its examples by epoch, in worker processes too.
    """

    def __init__(
        self, dataset: Sized, num_replicas: int, rank: int, shuffle: bool, seed: int, tag_epoch: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.skip = 0
        self.tag_epoch = tag_epoch

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        if self.tag_epoch:
            return iter([(self.epoch, index) for index in indices[skip:]])
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A `DataLoader` over a `ResumableDistributedSampler`; its state tells Lightning it resumes mid-epoch.

    The position inside the epoch comes from the trainer's own progress counters (see
    `build_loader`); the state saved here is the sampler's seed, checked on load, because a
    different seed would silently replay a different order.
    """

    sampler: ResumableDistributedSampler

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.sampler.seed, "shuffle": self.sampler.shuffle}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("seed"), state_dict.get("shuffle"))
        if saved != (self.sampler.seed, self.sampler.shuffle):
            rank_zero_warn(
                f"resuming with data order (seed, shuffle)={(self.sampler.seed, self.sampler.shuffle)} but the "
                f"checkpoint was written with {saved}: the resumed run will not see the same batches."
            )


def build_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any],
    trainer: L.Trainer | None,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    tag_epoch: bool = False,
) -> ResumableDataLoader:
    """A loader whose order is fixed by ``seed`` and the epoch, sharded over the trainer's ranks.

    For the training loader of a run resumed mid-epoch, the batches the checkpointed run had
    finished in that epoch are skipped, so the resumed run sees exactly the batches the
    uninterrupted run would have. With ``tag_epoch`` the dataset is indexed by ``(epoch, index)``.
    """
    world_size = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed, tag_epoch=tag_epoch)  # type: ignore[arg-type]
    loader = ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # its own generator for the seed each iterator draws: from torch's global one, every new epoch would
        # advance the global random state between a checkpoint written at an epoch's last batch and the next step
        generator=torch.Generator().manual_seed(seed),
    )
    if trainer is not None and shuffle:
        # `processed`, not `completed`: a checkpoint written in `on_train_batch_end` (ModelCheckpoint's
        # every_n_train_steps) is saved before Lightning counts that batch as completed.
        finished = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]
        if 0 < finished < len(loader):
            sampler.skip = finished * batch_size
    return loader
