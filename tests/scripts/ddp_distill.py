"""Run by tests/test_distillation.py: DistillationModule under 2-process DDP (gloo, CPU).

Each rank writes the checksum of its final student weights and what it saw of the teacher to
OUT/rank{r}.json; the test compares the ranks.
"""

import json
import os
import sys

import lightning as L
import torch
from transformers import GPT2Config

from lit_bigmodel import DistillationModule
from lit_bigmodel.datamodules import ArithmeticDataModule

out = sys.argv[1]
L.seed_everything(0)
config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16)
module = DistillationModule(
    config, GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16), alpha=0.5, learning_rate=1e-2
)
dm = ArithmeticDataModule(max_operand=12, num_val=20, num_test=20, batch_size=8, eval_batch_size=20)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
)  # fmt: skip
trainer.fit(module, dm)
first_batch = next(iter(trainer.train_dataloader))
report = {
    "world_size": trainer.world_size,
    "student_checksum": float(sum(p.double().sum() for p in module.model.parameters())),
    "teacher_grads": sum(p.grad is not None for p in module.teacher.parameters()),
    "teacher_trainable": sum(p.requires_grad for p in module.teacher.parameters()),
    "first_prompt": first_batch["input_ids"][0].tolist(),
    "batches": len(trainer.train_dataloader),
}
with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as handle:
    json.dump(report, handle)
torch.distributed.barrier()
