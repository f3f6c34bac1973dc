"""CSV, TensorBoard and Weights & Biases (offline) loggers all receive SFTModule's metrics."""

from __future__ import annotations

import csv
import time

import pytest

from lit_bigmodel import SFTModule
from lit_bigmodel.datamodules import ArithmeticDataModule
from tests.conftest import tiny_trainer


def _fit(tmp_path, logger, tiny_gpt2_config):
    dm = ArithmeticDataModule(max_operand=9, num_val=10, num_test=10, batch_size=8)
    trainer = tiny_trainer(
        tmp_path, logger=logger, max_steps=6, log_every_n_steps=2, val_check_interval=3, check_val_every_n_epoch=None
    )
    trainer.fit(SFTModule(tiny_gpt2_config, learning_rate=1e-3), dm)
    return trainer


def test_csv_logger_writes_train_and_val_metrics(tmp_path, tiny_gpt2_config):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, logger, tiny_gpt2_config)
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("train/loss") for row in rows)
    assert any(row.get("val/exact_match") for row in rows)


def test_tensorboard_logger_writes_event_files(tmp_path, tiny_gpt2_config):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, logger, tiny_gpt2_config)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])


def test_wandb_offline_writes_a_run_directory(tmp_path, tiny_gpt2_config, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="lit-bigmodel-test", save_dir=str(tmp_path), offline=True)
    _fit(tmp_path, logger, tiny_gpt2_config)
    summary = dict(logger.experiment.summary)
    assert {"train/loss", "val/exact_match"} <= set(summary), sorted(summary)
    logger.experiment.finish()
    # `finish()` can return before W&B's service process has flushed the run file (a CI run read the
    # 7-byte header alone); tearing the service down closes the file, and the wait covers a slow close.
    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1, list(runs[0].iterdir())
    deadline = time.monotonic() + 60
    while True:
        data = records[0].read_bytes()  # the run's protobuf records, with the metric keys
        if (b"train/loss" in data and b"val/exact_match" in data) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"train/loss" in data and b"val/exact_match" in data, f"{len(data)} bytes in {records[0].name}"
