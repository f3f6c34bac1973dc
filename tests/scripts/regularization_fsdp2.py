"""Run by tests/test_regularization.py: `L1L2` on a GPT-2 under FSDP2 (2 CPU processes, gloo), against whole weights.

    python tests/scripts/regularization_fsdp2.py OUT

Trains 3 steps with ``L1L2(l1, l2)``. A probe's step pre-hook (registered before the callback's, so it runs
first, around the innermost closure) gathers the whole weights and gradients of the penalised parameters; after each step the gathered
gradients are compared with probe gradient + λ1·sign(w) + 2·λ2·w. After the fit, the callback's penalty
of the sharded weights is compared with the penalty of the gathered weights as one process computes it.
Rank 0 writes OUT/report.json.
"""

import json
import os
import sys

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from transformers import GPT2Config

from lit_bigmodel import SFTModule
from lit_bigmodel.callbacks._steps import torch_optimizer
from lit_bigmodel.callbacks.regularization import L1L2
from lit_bigmodel.datamodules import ArithmeticDataModule
from lit_bigmodel.strategies import fsdp2_strategy

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
L1, L2 = 1e-3, 1e-2


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


class Probe(L.Callback):
    def __init__(self, regularization: L1L2) -> None:
        self.regularization = regularization
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []  # (whole weight, whole gradient) before the penalty
        self.penalties: list[float] = []  # penalty of the whole weights before each step
        self.grad_errors: list[float] = []

    def on_fit_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.params = [p for _, p in self.regularization.select(pl_module)]
        torch_optimizer(trainer.optimizers[0]).register_step_pre_hook(self.pre_step)

    def pre_step(self, optimizer, args, kwargs):  # type: ignore[no-untyped-def]
        closure = kwargs["closure"]  # Lightning's backward and gradient hooks; L1L2 wraps what this returns

        def closure_then_record():  # type: ignore[no-untyped-def]
            result = closure()
            self.before = [(whole(p), whole(p.grad)) for p in self.params]
            self.penalties.append(float(self.regularization.penalty([w for w, _ in self.before])))
            return result

        return args, {**kwargs, "closure": closure_then_record}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        for p, (weight, grad) in zip(self.params, self.before):
            expected = grad + L1 * weight.sign() + 2 * L2 * weight
            self.grad_errors.append(float((whole(p.grad) - expected).abs().max()))


L.seed_everything(0)
config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
module = SFTModule(config, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
regularization = L1L2(l1=L1, l2=L2)
probe = Probe(regularization)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy=fsdp2_strategy(), logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, regularization], max_steps=3,
    limit_val_batches=0, num_sanity_val_steps=0,
)  # fmt: skip
trainer.fit(module, ArithmeticDataModule(max_operand=12, num_val=20, num_test=20, batch_size=8))

params = [p for _, p in regularization.select(module)]
penalty_sharded = float(regularization.penalty(params))  # local shard sums, all-reduced
penalty_single = float(regularization.penalty([whole(p) for p in params]))  # whole tensors, no communication
report = {
    "world_size": trainer.world_size,
    "sharded": sum(isinstance(p, DTensor) and p.placements[0].is_shard() for p in params),
    "targets": len(params),
    "penalty_sharded": penalty_sharded,
    "penalty_single": penalty_single,
    # what this rank's shards alone sum to: what an un-reduced penalty would log
    "penalty_local": float(regularization.penalty([p.to_local() if isinstance(p, DTensor) else p for p in params])),
    "logged": float(trainer.callback_metrics["regularization/penalty"]),
    "penalty_single_before_last_step": probe.penalties[-1],
    "max_abs_grad_error": max(probe.grad_errors),
}
if trainer.is_global_zero:
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle)
torch.distributed.barrier()
