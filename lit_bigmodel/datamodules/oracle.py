"""`OracleDataModule`: SeqGAN's synthetic benchmark data, sampled from the oracle LSTM."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_bigmodel.datamodules._collate import stack_tokens
from lit_bigmodel.datamodules._sampling import build_loader
from lit_bigmodel.errors import ConfigurationError, MissingPathError
from lit_bigmodel.nets.lstm import LSTMGenerator

DEFAULT_ORACLE = os.path.join("..", "shared", "data", "seqgan_oracle_lstm.npz")


class OracleDataModule(L.LightningDataModule):
    """The oracle's ``num_sequences`` samples (paper: 10,000 of length 20) as the real data.

    Args:
        oracle: path of the released parameters (``.npz`` or the original ``target_params_py3.pkl``),
            default ``../shared/data/seqgan_oracle_lstm.npz``; or ``"random"`` for a randomly
            initialised oracle (tests), seeded by ``oracle_seed``.
        seed: seeds the sampling of the data and the shuffling.

    Example::

        dm = OracleDataModule("seqgan_oracle_lstm.npz", num_sequences=10_000, batch_size=64)
    """

    def __init__(
        self,
        oracle: str = DEFAULT_ORACLE,
        num_sequences: int = 10_000,
        seq_len: int = 20,
        batch_size: int = 64,
        seed: int = 0,
        oracle_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_sequences < 1 or batch_size < 1 or seq_len < 1:
            raise ConfigurationError(
                f"`num_sequences`, `seq_len` and `batch_size` must be >= 1, got {num_sequences}, {seq_len}, {batch_size}."
            )
        if oracle != "random" and not os.path.isfile(oracle):
            raise MissingPathError(
                f"oracle parameters {oracle!r} do not exist; give the path of seqgan_oracle_lstm.npz "
                "(or SeqGAN's target_params_py3.pkl), or oracle='random'."
            )
        self.oracle_source = oracle
        self.num_sequences, self.seq_len, self.batch_size = num_sequences, seq_len, batch_size
        self.seed, self.oracle_seed, self.num_workers = seed, oracle_seed, num_workers
        self.oracle = LSTMGenerator.oracle(None if oracle == "random" else oracle, seed=oracle_seed, seq_len=seq_len)
        self.data: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self.oracle.sample(self.num_sequences, generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader[Any]:
        self.setup()
        assert self.data is not None
        return build_loader(
            list(self.data), batch_size=self.batch_size, collate_fn=stack_tokens, trainer=self.trainer,  # type: ignore[arg-type]
            shuffle=True, seed=self.seed, num_workers=self.num_workers,
        )  # fmt: skip
