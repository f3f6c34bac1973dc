"""Run by tests/test_pruning.py: the Pruning callback under 2-process DDP (gloo, CPU).

Each rank writes a fingerprint of its masks and weights and the sparsity counted from its weights
to OUT/rank{r}.json; the test compares the ranks.
"""

import hashlib
import json
import os
import sys

import lightning as L
import torch
from transformers import GPT2Config

from lit_bigmodel import SFTModule
from lit_bigmodel.callbacks.pruning import Pruning
from lit_bigmodel.datamodules import ArithmeticDataModule

out = sys.argv[1]
L.seed_everything(0)
config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16)
module = SFTModule(config, learning_rate=1e-2)
dm = ArithmeticDataModule(max_operand=12, num_val=20, num_test=20, batch_size=8, eval_batch_size=20)
pruning = Pruning(
    final_sparsity=0.5, scope="global", start_step=1, end_step=5, frequency=1, make_permanent_at_end=False
)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[pruning],
)  # fmt: skip
trainer.fit(module, dm)


def fingerprint(tensors):
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


report = {
    "world_size": trainer.world_size,
    "masks": fingerprint(pruning.masks[name] for name in sorted(pruning.masks)),
    "weights": fingerprint(p for p in module.model.parameters()),
    "sparsity": pruning.measure_sparsity()["global"],
    "first_prompt": next(iter(trainer.train_dataloader))["input_ids"][0].tolist(),
}
with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as handle:
    json.dump(report, handle)
torch.distributed.barrier()
