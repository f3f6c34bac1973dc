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

ORACLE_ENV = "LIT_BIGMODEL_SEQGAN_ORACLE"
ORACLE_FILE = "seqgan_oracle_lstm.npz"


def default_oracle_path() -> str:
    """Where the oracle's parameters are looked for when no path is given.

    ``$LIT_BIGMODEL_SEQGAN_ORACLE`` if set, else ``seqgan_oracle_lstm.npz`` in the user cache folder
    (``$XDG_CACHE_HOME/lit_bigmodel``, default ``~/.cache/lit_bigmodel``).
    """
    if os.environ.get(ORACLE_ENV):
        return os.environ[ORACLE_ENV]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "lit_bigmodel", ORACLE_FILE)


def resolve_oracle(oracle: str | os.PathLike[str] | None) -> str:
    """The oracle source to load: ``"random"``, the path given, or `default_oracle_path` for None.

    Raises:
        MissingPathError: the file does not exist; the message says where the paper's file comes from.
    """
    if oracle == "random":
        return "random"
    path = os.fspath(oracle) if oracle is not None else default_oracle_path()
    if not os.path.isfile(path):
        given = (
            f"oracle parameters {path!r} do not exist"
            if oracle is not None
            else f"no `oracle` given and {path!r} does not exist"
        )
        raise MissingPathError(
            f"{given}. The paper's oracle is `save/target_params_py3.pkl` of the SeqGAN authors' released code "
            f"(LantaoYu/SeqGAN), or its NumPy conversion {ORACLE_FILE}: pass its path as `oracle`, set "
            f"{ORACLE_ENV}, or copy it to {default_oracle_path()!r}; oracle='random' uses a random oracle."
        )
    return path


class OracleDataModule(L.LightningDataModule):
    """The oracle's ``num_sequences`` samples (paper: 10,000 of length 20) as the real data.

    Args:
        oracle: path of the released parameters (``.npz`` or the original ``target_params_py3.pkl``);
            None: ``$LIT_BIGMODEL_SEQGAN_ORACLE``, else ``~/.cache/lit_bigmodel/seqgan_oracle_lstm.npz``
            (`default_oracle_path`); or ``"random"`` for a randomly initialised oracle (tests), seeded
            by ``oracle_seed``.
        seed: seeds the sampling of the data and the shuffling.

    Example::

        dm = OracleDataModule("seqgan_oracle_lstm.npz", num_sequences=10_000, batch_size=64)
    """

    def __init__(
        self,
        oracle: str | None = None,
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
        oracle = resolve_oracle(oracle)
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
