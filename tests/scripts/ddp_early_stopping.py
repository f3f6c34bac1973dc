"""Run by tests/test_early_stopping.py: the training-control callbacks under 2-process DDP (gloo, CPU).

1. EarlyStopping(restore_best_weights) and LRDecay("plateau") on a ``val_loss`` that differs per rank;
2. PrecisionMonitor(policy="stop") with non-finite gradients on rank 1 only.

Each rank writes what it decided to OUT/rank{r}.json; the test compares the ranks.
"""

import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_bigmodel.callbacks import EarlyStopping, LRDecay, PrecisionMonitor

out = sys.argv[1]
# per-rank val_loss; the mean over ranks is (5, 3, 3.5, 3.25, 3, 3, 3, 3): best epoch 1, 2 bad epochs → stop at 3
METRIC = {0: [5.0, 4.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0], 1: [5.0, 2.0, 6.0, 3.5, 3.0, 3.0, 3.0, 3.0]}


class Regression(L.LightningModule):
    def __init__(self, inf_on_rank1_at=None):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.inf_on_rank1_at = inf_on_rank1_at
        self.epoch_end_weights = []
        self.lrs = []

    def training_step(self, batch, batch_idx):
        return (self.lin(batch[0]) - 1.0).pow(2).mean()

    def on_after_backward(self):  # after DDP's all-reduce: only rank 1's gradients are non-finite
        if self.global_rank == 1 and self.global_step == self.inf_on_rank1_at:
            self.lin.weight.grad[0, 0] = float("inf")

    def on_train_epoch_end(self):
        self.epoch_end_weights.append(self.lin.weight.detach().flatten().tolist())
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", METRIC[self.global_rank][self.current_epoch])  # no sync_dist: differs per rank

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer(**kwargs):
    return L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


data = TensorDataset(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))
L.seed_everything(0)
module = Regression()
stopper = EarlyStopping("val_loss", patience=2)
decay = LRDecay("plateau", monitor="val_loss", patience=0, factor=0.5)
first = trainer(max_epochs=len(METRIC[0]), limit_val_batches=1, callbacks=[stopper, decay])
first.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))

monitor = PrecisionMonitor(policy="stop")
second = trainer(max_steps=10, limit_val_batches=0, callbacks=[monitor])
probe = Regression(inf_on_rank1_at=2)
second.fit(probe, DataLoader(data, batch_size=4))

report = {
    "world_size": first.world_size,
    "stopped_epoch": stopper.stopped_epoch,
    "best_epoch": stopper.best_epoch,
    "best_score": float(stopper.best_score),
    "final_weights": module.lin.weight.detach().flatten().tolist(),
    "epoch_end_weights": module.epoch_end_weights,
    "lrs": module.lrs,
    "precision_stop_step": second.global_step,
    "precision_found_locally": monitor.stop_reason is not None and "another rank" not in monitor.stop_reason,
    "precision_reason": monitor.stop_reason,
}
with open(os.path.join(out, f"rank{first.global_rank}.json"), "w") as handle:
    json.dump(report, handle)
torch.distributed.barrier()
