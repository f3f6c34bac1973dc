"""`TeacherLogitsDataModule`: the teacher's top-k logits computed once, cached on disk, served with each batch."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_bigmodel.datamodules._base import TokenizedDataModule
from lit_bigmodel.datamodules._sampling import build_loader
from lit_bigmodel.errors import ConfigurationError, MissingPathError
from lit_bigmodel.nets.builders import ModelSource, Task, build_model


class TeacherLogitsDataModule(L.LightningDataModule):
    """Wrap a tokenized datamodule so that training batches carry the teacher's cached top-k logits.

    The first ``setup`` with a ``teacher`` runs it once over the training split (no shuffling, no
    gradients) and writes, per example, the top-k logits (float16) and their token ids (int32) to
    ``cache_path`` (atomically). Later runs pass ``teacher=None`` and read the file: the student
    trains without the teacher in memory. Batches gain ``teacher_topk_values`` and
    ``teacher_topk_indices`` of shape ``(B, T, k)`` (``(B, k)`` for classification), which
    `DistillationModule` with ``teacher=None`` uses. Validation and test come from the wrapped
    datamodule unchanged.

    Example::

        cached = TeacherLogitsDataModule(ArithmeticDataModule(), cache_path="teacher_top16.pt",
                                         teacher="runs/teacher", top_k=16)
        L.Trainer(max_steps=1000).fit(DistillationModule(student_config, teacher=None), cached)
    """

    def __init__(
        self,
        datamodule: TokenizedDataModule,
        cache_path: str,
        teacher: ModelSource | None = None,
        top_k: int = 16,
        task: Task = "causal_lm",
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        if top_k < 1:
            raise ConfigurationError(f"`top_k` must be >= 1, got {top_k!r}.")
        if teacher is None and not os.path.isfile(cache_path):
            raise MissingPathError(f"teacher-logit cache {cache_path!r} does not exist; pass `teacher` to compute it.")
        if getattr(datamodule, "packing", False):
            raise ConfigurationError(
                "cached teacher logits need unpacked examples: set the datamodule's packing=False."
            )
        if getattr(datamodule, "augment", None) is not None:
            raise ConfigurationError(
                "cached teacher logits are computed once, for the original texts, and `augment` rewrites the "
                "training texts every epoch: set the datamodule's augment=None."
            )
        self.datamodule = datamodule
        self.cache_path = cache_path
        self.teacher = teacher
        self.top_k = top_k
        self.task = task
        self.batch_size = batch_size
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def tokenizer(self) -> Any:
        return self.datamodule.tokenizer

    def validate_inputs(self) -> None:
        """Check the wrapped datamodule's inputs (its `validate_inputs`) and the cache path; write nothing.

        Example::

            TeacherLogitsDataModule(dm, cache_path="top16.pt", teacher="runs/teacher").validate_inputs()
        """
        if os.path.isdir(self.cache_path):
            raise ConfigurationError(
                f"`cache_path` {self.cache_path!r} is a directory: the teacher-logit cache is one file."
            )
        self.datamodule.validate_inputs()

    def setup(self, stage: str | None = None) -> None:
        self.validate_inputs()
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        if self.cache is not None:
            return
        train = self.datamodule.datasets["train"]
        if os.path.isfile(self.cache_path):
            self.cache = torch.load(self.cache_path, weights_only=True)
        else:
            self.cache = self._compute(train)
            tmp = f"{self.cache_path}.tmp{os.getpid()}"
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
            torch.save(self.cache, tmp)
            os.replace(tmp, self.cache_path)
        if len(self.cache) != len(train):
            raise ConfigurationError(
                f"the teacher-logit cache {self.cache_path!r} holds {len(self.cache)} examples but the training split has "
                f"{len(train)}: it was computed for other data; delete it to recompute."
            )

    @torch.no_grad()
    def _compute(self, train: list[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        assert self.teacher is not None
        teacher = build_model(self.teacher, self.task, tokenizer=self.tokenizer).eval()
        collate = self.datamodule.collate_fn("train")
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for start in range(0, len(train), self.batch_size):
            chunk = train[start : start + self.batch_size]
            batch = collate(chunk)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            logits = teacher(**inputs).logits.float()  # (B, T, V) or (B, C)
            values, indices = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
            for i, example in enumerate(chunk):
                if logits.dim() == 3:
                    n = len(example["input_ids"])
                    cache.append((values[i, :n].half(), indices[i, :n].int()))
                else:
                    cache.append((values[i].half(), indices[i].int()))
        del teacher
        return cache

    def train_dataloader(self) -> DataLoader[Any]:
        assert self.cache is not None
        dm = self.datamodule
        indexed = [dict(example, _cache_index=i) for i, example in enumerate(dm.datasets["train"])]
        return build_loader(
            indexed,  # type: ignore[arg-type]
            batch_size=dm.batch_size,
            collate_fn=_WithTeacherLogits(dm.collate_fn("train"), self.cache),
            trainer=self.trainer,
            shuffle=True,
            seed=dm.seed,
            num_workers=dm.num_workers,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> DataLoader[Any]:
        return self.datamodule.test_dataloader()


class _WithTeacherLogits:
    """Collate with the wrapped collator, then add the cached teacher top-k, padded to the batch length."""

    def __init__(
        self, collate: Callable[[list[Any]], dict[str, torch.Tensor]], cache: list[tuple[torch.Tensor, torch.Tensor]]
    ):
        self.collate = collate
        self.cache = cache

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(examples)
        entries = [self.cache[example["_cache_index"]] for example in examples]
        if entries[0][0].dim() == 1:  # classification: (k,) per example
            batch["teacher_topk_values"] = torch.stack([v.float() for v, _ in entries])
            batch["teacher_topk_indices"] = torch.stack([i.long() for _, i in entries])
            return batch
        length, k = batch["input_ids"].shape[1], entries[0][0].shape[-1]
        values = torch.zeros(len(entries), length, k)
        indices = torch.zeros(len(entries), length, k, dtype=torch.long)
        for row, (v, i) in enumerate(entries):
            values[row, : v.shape[0]] = v.float()
            indices[row, : i.shape[0]] = i.long()
        batch["teacher_topk_values"] = values
        batch["teacher_topk_indices"] = indices
        return batch
