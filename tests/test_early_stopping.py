"""EarlyStopping: restored weights equal the best checkpoint's, best score and weights survive resume, it sits
next to Lightning's, sharded strategies are refused, errors name the argument, ranks decide alike (DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lit_bigmodel import ConfigurationError
from lit_bigmodel.callbacks import EarlyStopping
from tests.conftest import tiny_trainer


class Regression(L.LightningModule):
    """Linear(4, 1) trained by SGD; ``val_loss`` of epoch e is ``metric[e]`` (scripted, so the best epoch is known)."""

    def __init__(self, metric):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.metric = metric

    def training_step(self, batch, batch_idx):
        return (self.lin(batch[0]) - 1.0).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.metric[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(tmp_path, metric, callbacks, ckpt_path=None, **trainer_kwargs):
    L.seed_everything(0)
    module = Regression(metric)
    data = TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=trainer_kwargs.pop("max_epochs", len(metric)),
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return module, trainer


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_restored_weights_equal_the_best_checkpoint(tmp_path):
    stopper = EarlyStopping("val_loss", patience=2)
    checkpoint = ModelCheckpoint(tmp_path / "best", monitor="val_loss", save_top_k=1)
    latest = ModelCheckpoint(tmp_path / "latest", save_last=True)  # no monitor: saved every epoch
    module, trainer = _fit(tmp_path, [5.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0], [stopper, checkpoint, latest])
    assert stopper.stopped_epoch == 4 and trainer.current_epoch == 5  # stopped: 2 epochs without improvement
    assert stopper.best_epoch == 2 and float(stopper.best_score) == 2.0
    assert Path(checkpoint.best_model_path).name == "epoch=2-step=12.ckpt"
    assert _equal(module.state_dict(), _weights(checkpoint.best_model_path))
    assert Path(latest.last_model_path).name == "last.ckpt"
    last = torch.load(latest.last_model_path, map_location="cpu", weights_only=True)
    assert last["epoch"] == 4 and not _equal(module.state_dict(), last["state_dict"])  # the restore did something


def test_without_restore_the_last_weights_stay(tmp_path):
    stopper = EarlyStopping("val_loss", patience=2, restore_best_weights=False)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    module, _ = _fit(tmp_path, [5.0, 3.0, 2.0, 4.0, 6.0, 7.0], [stopper, checkpoint])
    assert _equal(module.state_dict(), _weights(checkpoint.last_model_path))


def test_best_score_and_best_weights_survive_resume(tmp_path):
    metric = [5.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # best at epoch 1, stop at epoch 4
    uninterrupted, _ = _fit(tmp_path / "a", metric, [EarlyStopping("val_loss", patience=3)])

    first = ModelCheckpoint(tmp_path / "b", save_last=True)
    _fit(tmp_path / "b", metric, [EarlyStopping("val_loss", patience=3), first], max_epochs=3)  # "interrupted"
    stopper = EarlyStopping("val_loss", patience=3)
    resumed, _ = _fit(tmp_path / "c", metric, [stopper], ckpt_path=first.last_model_path)
    assert stopper.stopped_epoch == 4 and stopper.best_epoch == 1 and float(stopper.best_score) == 2.0
    # the best weights were found before the interruption: only the checkpoint's callback state has them
    assert _equal(resumed.state_dict(), uninterrupted.state_dict())


def test_sits_next_to_lightnings_early_stopping(tmp_path):
    ours, theirs = EarlyStopping("val_loss", patience=2), LightningEarlyStopping("val_loss", patience=2)
    assert ours.state_key != theirs.state_key
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    _fit(tmp_path, [5.0, 3.0, 4.0, 4.0, 4.0], [ours, theirs, checkpoint])
    states = torch.load(checkpoint.last_model_path, map_location="cpu", weights_only=True)["callbacks"]
    assert ours.state_key in states and theirs.state_key in states
    assert "best_weights" in states[ours.state_key] and "best_weights" not in states[theirs.state_key]


@pytest.mark.parametrize(
    "strategy",
    [FSDPStrategy(), ModelParallelStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)],  # DS: not installed
    ids=["fsdp", "model_parallel", "deepspeed"],
)
def test_sharded_strategies_are_refused_with_what_to_use_instead(strategy):
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=strategy, val_check_interval=1.0, check_val_every_n_epoch=1)
    with pytest.raises(ConfigurationError, match=f"{type(strategy).__name__} shards.*ModelCheckpoint"):
        EarlyStopping("val_loss").setup(trainer, None, "fit")
    EarlyStopping("val_loss", restore_best_weights=False).setup(trainer, None, "fit")  # fine without restore


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"monitor": ""}, "monitor"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"patience": -1}, "patience"),
        ({"mode": "maximum"}, "mode"),
        ({"stopping_threshold": float("nan")}, "stopping_threshold"),
        ({"divergence_threshold": "high"}, "divergence_threshold"),
        ({"restore_best_weights": "yes"}, "restore_best_weights"),
        ({"min_delta": float("nan")}, "min_delta"),
        ({"min_delta": float("inf")}, "min_delta"),
        ({"min_delta": "0.1"}, "min_delta"),
        ({"patience": float("inf")}, "patience"),
        ({"divergence_threshold": float("-inf")}, "divergence_threshold"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        EarlyStopping(**{"monitor": "val_loss", **kwargs})


@pytest.mark.multiprocess
def test_two_process_ddp_gloo_ranks_decide_alike(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    script = root / "tests" / "scripts" / "ddp_early_stopping.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # each rank logs its own val_loss; alone, rank 0 would keep epoch 2 and rank 1 epoch 1 as the best
    for key in ("stopped_epoch", "best_epoch", "best_score", "final_weights", "lrs", "precision_stop_step"):
        assert ranks[0][key] == ranks[1][key], key
    assert ranks[0]["stopped_epoch"] == 3 and ranks[0]["best_epoch"] == 1 and ranks[0]["best_score"] == 3.0
    assert all(r["final_weights"] == r["epoch_end_weights"][1] for r in ranks)  # the best epoch's, on both ranks
    assert all(r["epoch_end_weights"][3] != r["epoch_end_weights"][1] for r in ranks)
    assert ranks[0]["lrs"][-1] < ranks[0]["lrs"][0]  # the plateau schedule reduced, on both ranks alike
    # PrecisionMonitor(policy="stop"): gradients non-finite on rank 1 only; both ranks stop at the same step
    assert ranks[0]["precision_stop_step"] == 3 and ranks[1]["precision_found_locally"]
    assert "another rank" in ranks[0]["precision_reason"]
