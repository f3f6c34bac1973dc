"""Run by tests/test_strategies.py: one module under one strategy, 2 CPU processes (gloo).

    python tests/scripts/sharded.py {sft,distill,seqgan,...} {ddp,fsdp,fsdp2,deepspeed_stage_2,deepspeed_stage_3,...} OUT

Trains a few steps, then (SFT and distillation) records the logits of the live, sharded model on a fixed
probe batch at the last validation, exports the model from the live run to OUT/export and saves a
checkpoint to OUT/ckpt. Rank 0 writes OUT/report.json: losses, whether the weights moved, what the
teacher did, and max |Δlogit| between the export reloaded with transformers and the sharded model.
An error at setup is written to OUT/error.txt (its class and message) and the script exits 3.

The LoRA kinds (``sft_lora``, ``distill_lora``) fine-tune a saved base (OUT/base) with peft LoRA on every
linear layer; they also export the adapter folder (OUT/adapter), record the sums of the frozen base and of
the adapters before and after training (from the gathered state dict), and resume from OUT/ckpt in a
second fit of 2 more steps, recording what that fit starts from.
"""

import json
import os
import sys

import lightning as L
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lit_bigmodel import DistillationModule, SeqGANModule, SFTModule
from lit_bigmodel.adapters import base_fingerprint
from lit_bigmodel.datamodules import ArithmeticDataModule, OracleDataModule
from lit_bigmodel.nets import CNNDiscriminator, LSTMGenerator
from lit_bigmodel.strategies import deepspeed_strategy, fsdp2_strategy, fsdp_strategy

kind, strategy_name, out = sys.argv[1], sys.argv[2], sys.argv[3]
LORA = kind in ("sft_lora", "distill_lora")
os.makedirs(out, exist_ok=True)
PROBE = torch.tensor([[3, 4, 1, 5, 6, 2, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])


def gpt2(n_layer: int, n_embd: int = 32) -> GPT2Config:
    return GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


def rank_local_checksum(module: torch.nn.Module) -> float:
    """Sum of the parameters as this rank sees them (a DTensor gathered whole: collective)."""
    total = 0.0
    for p in module.parameters():
        tensor = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float(tensor.detach().double().sum())
    return total


class Probe(L.Callback):
    """Losses of each step, and the live model's logits on PROBE at each validation (in eval mode)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.start: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if LORA:
            self.start["split"] = split_checksums(pl_module, trainer)
        if kind != "seqgan":
            self.start["student"] = full_checksum(pl_module.model, trainer.strategy)
        if kind.startswith("distill"):
            self.start["teacher"] = full_checksum(pl_module.teacher, trainer.strategy)
        if kind == "distill_hidden":
            self.start["projections"] = rank_local_checksum(pl_module.projections)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss))


class ProbedSFT(SFTModule):
    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 0:  # runs inside the strategy's forward: FSDP has gathered, ZeRO-3 hooks gather
            self.probe_logits = self.model(input_ids=PROBE.to(self.device)).logits.float().cpu()
        return super().validation_step(batch, batch_idx)


class ProbedDistillation(DistillationModule):
    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 0:
            self.probe_logits = self.model(input_ids=PROBE.to(self.device)).logits.float().cpu()
        return super().validation_step(batch, batch_idx)


def split_checksums(pl_module, trainer) -> dict | None:  # type: ignore[no-untyped-def]
    """Sums of the student's frozen base and of its adapters, from its full state dict (collective; rank 0 gets them)."""
    from lit_bigmodel._sharding import full_state_dict

    state = full_state_dict(trainer, pl_module, pl_module.model)
    if state is None:
        return None
    return {
        "base": float(sum(v.double().sum() for k, v in state.items() if "lora_" not in k)),
        "adapters": float(sum(v.double().sum() for k, v in state.items() if "lora_" in k)),
        "lora_B_abs": float(sum(v.double().abs().sum() for k, v in state.items() if "lora_B" in k)),
        "keys": len(state),
    }


def full_checksum(module: torch.nn.Module, strategy) -> float:  # type: ignore[no-untyped-def]
    """Sum of all parameters, gathered when ZeRO-3 or FSDP holds them sharded (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if getattr(strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return float(sum(p.detach().double().sum() for p in module.parameters()))
    if strategy_name in ("fsdp", "fsdp2"):
        state = get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True))
        prefix = next(name for name, child in strategy.lightning_module.named_children() if child is module)
        return float(sum(v.double().sum() for k, v in state.items() if k.startswith(prefix + ".")))
    return float(sum(p.detach().double().sum() for p in module.parameters()))


L.seed_everything(0)
make_strategy = {
    "ddp": lambda: "ddp_find_unused_parameters_true" if kind == "seqgan" else "ddp",
    "fsdp": lambda: fsdp_strategy(accelerator="cpu"),
    "deepspeed_stage_2": lambda: deepspeed_strategy(2, accelerator="cpu"),
    # every parameter partitioned (by default ZeRO-3 keeps parameters under 100k elements whole on each rank)
    "deepspeed_stage_3": lambda: deepspeed_strategy(3, accelerator="cpu", param_persistence_threshold=0),
    "fsdp2": lambda: fsdp2_strategy(),
    # checkpoints as one full file on rank 0 instead of a directory of shards (adapter-only with peft)
    "fsdp2_full_state": lambda: fsdp2_strategy(save_distributed_checkpoint=False),
    "deepspeed_stage_3_offload": lambda: deepspeed_strategy(
        3, accelerator="cpu", offload_optimizer=True, offload_parameters=True, param_persistence_threshold=0
    ),
}[strategy_name]
strategy = make_strategy()
callbacks: list = []
if LORA:  # a saved base, as users fine-tune: the adapter folder loads onto it
    from peft import LoraConfig

    base, teacher_dir = os.path.join(out, "base"), os.path.join(out, "teacher")
    if os.environ.get("LOCAL_RANK", "0") == "0":  # rank 0 runs this before it launches rank 1
        AutoModelForCausalLM.from_config(gpt2(2)).save_pretrained(base)
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(gpt2(2)).save_pretrained(teacher_dir)
    saved_state_checksum = float(
        sum(v.double().sum() for v in AutoModelForCausalLM.from_pretrained(base).state_dict().values())
    )

    def lora_module() -> SFTModule:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
        if kind == "sft_lora":
            return ProbedSFT(base, learning_rate=1e-2, warmup_steps=0, peft=lora)
        return ProbedDistillation(base, teacher_dir, alpha=0.5, learning_rate=1e-2, warmup_steps=0, peft=lora)

    module = lora_module()
elif kind == "sft_pretrained":  # from_pretrained inside configure_model (the ZeRO-3 case Lightning users hit)
    base = os.path.join(out, "base")
    if os.environ.get("LOCAL_RANK", "0") == "0":  # rank 0 runs this before it launches rank 1
        AutoModelForCausalLM.from_config(gpt2(2)).save_pretrained(base)
    saved = AutoModelForCausalLM.from_pretrained(base)
    saved_checksum = float(sum(p.detach().double().sum() for p in saved.parameters()))
    # what full_checksum sums under FSDP: the state dict, where tied weights appear under each name
    saved_state_checksum = float(sum(v.double().sum() for v in saved.state_dict().values()))
    module = ProbedSFT(base, learning_rate=1e-2, warmup_steps=0)
elif kind in ("sft", "sft_early_stopping", "sft_pruning"):
    module = ProbedSFT(gpt2(2), learning_rate=1e-2, warmup_steps=0)
    if kind == "sft_early_stopping":
        from lit_bigmodel.callbacks import EarlyStopping

        callbacks.append(EarlyStopping("val/loss", restore_best_weights=True))
    if kind == "sft_pruning":
        from lit_bigmodel.callbacks import Pruning

        callbacks.append(Pruning("unstructured", final_sparsity=0.5))
elif kind == "distill":
    module = ProbedDistillation(gpt2(1), gpt2(2), alpha=0.5, learning_rate=1e-2, warmup_steps=0)
elif kind == "distill_hidden":  # a narrower student: hidden states matched through a learned projection
    module = ProbedDistillation(
        gpt2(1, n_embd=16), gpt2(2), alpha=0.5, learning_rate=1e-2, warmup_steps=0, hidden_layer_map={1: 2}
    )
else:
    module = SeqGANModule(
        LSTMGenerator(5000, 8, 8, 6), CNNDiscriminator(5000, 8, (1, 2, 3), (4, 4, 4)),
        mle_epochs=1, d_pretrain_rounds=1, d_epochs=1, adv_epochs=1, d_steps=1, rollout_num=2, nll_samples=64,
        eval_every=1,
    )  # fmt: skip
if kind == "seqgan":
    dm = OracleDataModule("random", num_sequences=64, seq_len=6, batch_size=8)
    limits = {"max_epochs": -1}
else:
    dm = ArithmeticDataModule(max_operand=12, num_val=20, num_test=20, batch_size=8, eval_batch_size=20)
    limits = {"max_steps": 6, "val_check_interval": 6, "limit_val_batches": 1, "num_sanity_val_steps": 0}
probe = Probe()
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, *callbacks], **limits,
)  # fmt: skip
try:
    trainer.fit(module, dm)
except ValueError as err:  # our ConfigurationError and other argument errors: refused at setup
    if trainer.global_rank == 0:
        with open(os.path.join(out, "error.txt"), "w") as handle:
            handle.write(f"{type(err).__name__}: {err}")
    sys.exit(3)

report: dict = {"world_size": trainer.world_size, "losses": probe.losses, "global_step": trainer.global_step}
if LORA:
    report["start"] = probe.start
    report["end"] = split_checksums(module, trainer)
    report["saved_state_checksum"] = saved_state_checksum
    trainable = [name for name, p in module.model.named_parameters() if p.requires_grad]
    report["trainable"] = len(trainable)
    report["trainable_not_lora"] = [name for name in trainable if "lora_" not in name]
    report["dtypes"] = sorted({str(p.dtype) for p in module.model.parameters()})
    report["fingerprint_at_build"] = module._base_fingerprint
    report["fingerprint_live"] = base_fingerprint(module.model)  # [] where the weights are shards; no collective
    if kind == "distill_lora":
        report["teacher_trainable"] = sum(p.requires_grad for p in module.teacher.parameters())
        report["teacher_lora"] = sum("lora_" in name for name, _ in module.teacher.named_parameters())
    module.export(os.path.join(out, "export"))  # collective: every rank calls it
    module.export(os.path.join(out, "adapter"), merge=False)
    trainer.save_checkpoint(os.path.join(out, "ckpt"))
    if trainer.is_global_zero:
        from peft import PeftModel

        with torch.no_grad():
            merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "export")).eval()
            report["max_abs_dlogit"] = float((merged(input_ids=PROBE).logits - module.probe_logits).abs().max())
            adapted = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base), os.path.join(out, "adapter")
            )
            logits = adapted.eval()(input_ids=PROBE).logits
            report["adapter_max_abs_dlogit"] = float((logits - module.probe_logits).abs().max())
        torch.save(module.probe_logits, os.path.join(out, "probe_logits.pt"))
    # resume from the checkpoint: 2 more steps, from what the first fit ended with
    resumed, resumed_probe = lora_module(), Probe()
    second = L.Trainer(
        accelerator="cpu", devices=2, strategy=make_strategy(), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[resumed_probe], max_steps=8,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    second.fit(resumed, dm, ckpt_path=os.path.join(out, "ckpt"))
    report["resumed"] = {
        "global_step": second.global_step,
        "losses": resumed_probe.losses,
        "start": resumed_probe.start.get("split"),
    }
elif kind == "seqgan":
    report["phase"] = module.schedule["phase"]
    report["history"] = module.history
else:
    report["student_checksum"] = full_checksum(module.model, trainer.strategy)
    report["start"] = probe.start
    if kind == "sft_pretrained":
        report["saved_checksum"] = saved_checksum
        report["saved_state_checksum"] = saved_state_checksum
    if getattr(trainer.strategy, "zero_stage_3", False):  # outside a forward, ZeRO-3 parameters are empty shards
        report["partitioned"] = sum(p.data.numel() == 0 for p in module.model.parameters())
        report["parameters"] = len(list(module.model.parameters()))
    if kind == "distill_hidden":  # every rank must hold the same projection (its gradients are reduced)
        checksums = [None] * trainer.world_size
        torch.distributed.all_gather_object(checksums, rank_local_checksum(module.projections))
        report["projection_checksums"] = checksums
        report["projection_start"] = probe.start.get("projections")
    if kind.startswith("distill"):
        report["teacher_checksum"] = full_checksum(module.teacher, trainer.strategy)
        report["teacher_trainable"] = sum(p.requires_grad for p in module.teacher.parameters())
        report["teacher_grads"] = sum(p.grad is not None for p in module.teacher.parameters())
        optimizer = trainer.optimizers[0]
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        report["teacher_in_optimizer"] = sum(id(p) in optimized for p in module.teacher.parameters())
    report["optimizer"] = type(getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])).__name__
    export_dir = os.path.join(out, "export")
    module.export(export_dir)  # collective: every rank calls it
    trainer.save_checkpoint(os.path.join(out, "ckpt"))
    if trainer.is_global_zero:
        reloaded = AutoModelForCausalLM.from_pretrained(export_dir).eval()
        with torch.no_grad():
            exported = reloaded(input_ids=PROBE).logits.float()
        report["max_abs_dlogit"] = float((exported - module.probe_logits).abs().max())
        torch.save(module.probe_logits, os.path.join(out, "probe_logits.pt"))
if trainer.is_global_zero:
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle)
torch.distributed.barrier()
