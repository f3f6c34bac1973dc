"""Run by tests/test_seqgan.py: SeqGANModule under 2-process DDP (gloo, CPU), through its adversarial phase."""

import json
import os
import sys

import lightning as L
import torch

from lit_bigmodel import SeqGANModule
from lit_bigmodel.datamodules import OracleDataModule
from lit_bigmodel.nets import CNNDiscriminator, LSTMGenerator

out = sys.argv[1]
L.seed_everything(0)
module = SeqGANModule(
    LSTMGenerator(5000, 8, 8, 6), CNNDiscriminator(5000, 8, (1, 2, 3), (4, 4, 4)),
    mle_epochs=1, d_pretrain_rounds=1, d_epochs=1, adv_epochs=1, d_steps=1, rollout_num=2, nll_samples=64, eval_every=1,
)  # fmt: skip
dm = OracleDataModule("random", num_sequences=64, seq_len=6, batch_size=8)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=-1, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
)  # fmt: skip
trainer.fit(module, dm)
report = {
    "world_size": trainer.world_size,
    "phase": module.schedule["phase"],
    "g_checksum": float(sum(p.double().sum() for p in module.generator.parameters())),
    "d_checksum": float(sum(p.double().sum() for p in module.discriminator.parameters())),
    "history": module.history,
}
with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as handle:
    json.dump(report, handle)
torch.distributed.barrier()
