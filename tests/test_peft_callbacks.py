"""The callbacks with `peft` adapters (SFTModule and DistillationModule students, GPT-2 and a Llama GQA config):
LRDecay sets the adapter optimizer's rate by its closed form and resumes from adapter-only checkpoints,
PrecisionMonitor watches the adapter gradients only, EarlyStopping keeps adapter-only copies and resumes
exactly, Pruning refuses adapters (the merged export would lose its zeros) and prunes a merged export."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from lit_bigmodel import ConfigurationError, DistillationModule, SFTModule
from lit_bigmodel.callbacks import EarlyStopping, LRDecay, PrecisionMonitor, Pruning
from lit_bigmodel.datamodules import ArithmeticDataModule
from tests.conftest import tiny_trainer
from tests.test_peft import CONFIGS, _lora

LR = 1e-2


class _Faults:
    """Injects a NaN loss at the training batches ``nan_loss_at`` (indices within the epoch)."""

    nan_loss_at: frozenset[int] = frozenset()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx in self.nan_loss_at else loss


class FaultySFT(_Faults, SFTModule):
    pass


class FaultyDistillation(_Faults, DistillationModule):
    pass


def _module(kind, arch, faulty=False, **kwargs):
    """An adapted module, seeded: the same call builds the same base and the same adapters."""
    L.seed_everything(0)
    if kind == "sft":
        return (FaultySFT if faulty else SFTModule)(CONFIGS[arch](), learning_rate=LR, peft=_lora(), **kwargs)
    cls = FaultyDistillation if faulty else DistillationModule
    return cls(CONFIGS[arch](), CONFIGS[arch](), hidden_layer_map={2: 2}, learning_rate=LR, peft=_lora(), **kwargs)


def _data():
    return ArithmeticDataModule(batch_size=16, num_val=16, num_test=16)


def _fit(module, tmp_path, callbacks, ckpt_path=None, **trainer_kwargs):
    trainer_kwargs.setdefault("limit_val_batches", 0)
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return trainer


def _trainable(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def _frozen(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if not p.requires_grad}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Spy(L.Callback):
    """Records, independently of the callbacks under test: each real step's rates, the gradients seen before each
    optimizer step (listed after the callback under test, it sees what that one left), and the trainable weights
    at the start (``weights[0]``) and after each optimizer step ``k`` (``weights[k + 1]``)."""

    def on_train_start(self, trainer, pl_module):
        self.rates, self.norms, self.frozen_with_grads = [], [], set()
        self.weights, self._step = [_trainable(pl_module)], trainer.global_step
        trainer.optimizers[0].register_step_pre_hook(  # the rates this step uses
            lambda optimizer, *_: self.rates.append([g["lr"] for g in optimizer.param_groups])
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None
        self.norms.append(None if norm is None else float(norm))
        self.frozen_with_grads |= {
            n for n, p in pl_module.named_parameters() if not p.requires_grad and p.grad is not None
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:  # not an accumulation micro-batch
            self._step = trainer.global_step
            self.weights.append(_trainable(pl_module))


CASES = [  # (module kind, architecture, gradient accumulation)
    pytest.param("sft", "gpt2", 2, id="sft-gpt2-accumulate2"),
    pytest.param("distillation", "llama", 1, id="distillation-llama"),
]


# ---------------------------------------------------------------------------------------------- LRDecay
def _inverse_time(t, a0, warmup=2, beta=0.5, power=2.0):
    """α0 (t + 1) / W in the warmup, then α0 / (1 + β (t − W))^p: written independently of lit_bigmodel."""
    return a0 * (t + 1) / warmup if t < warmup else a0 / (1 + beta * (t - warmup)) ** power


@pytest.mark.parametrize(("kind", "arch", "accumulate"), CASES)
def test_lr_decay_sets_the_adapter_optimizers_rate_by_its_closed_form(tmp_path, kind, arch, accumulate):
    module = _module(kind, arch)
    decay, spy = LRDecay("inverse_time", warmup_steps=2, decay_rate=0.5, power=2.0), Spy()
    trainer = _fit(module, tmp_path, [decay, spy], max_steps=6, accumulate_grad_batches=accumulate)
    optimizer = trainer.optimizers[0]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}  # the adapters (and projections)
    assert decay.initial_lrs[0] == [LR] * len(optimizer.param_groups) and decay.steps == {0: 6}
    expected = [_inverse_time(t, LR) for t in range(7)]
    assert [rates[0] for rates in spy.rates] == pytest.approx(expected[:6], rel=1e-12)
    assert all(len(set(rates)) == 1 for rates in spy.rates)  # every param group alike
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected[6]] * len(optimizer.param_groups))
    assert trainer.lr_scheduler_configs == []  # the callback owns the rate: the module installs no scheduler


def test_lr_decay_resumes_from_an_adapter_only_checkpoint_with_the_uninterrupted_rates(tmp_path):
    def run(ckpt_path=None):
        module, spy = _module("sft", "llama"), Spy()
        checkpoints = ModelCheckpoint(tmp_path / "checkpoints", filename="{step}", every_n_train_steps=3, save_top_k=-1)
        callbacks = [LRDecay("cosine", warmup_steps=4, min_lr=1e-4), spy, checkpoints]
        _fit(module, tmp_path, callbacks, ckpt_path, max_steps=8, accumulate_grad_batches=2, enable_checkpointing=True)
        return module, spy

    straight, uninterrupted = run()
    path = tmp_path / "checkpoints" / "step=3.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(_trainable(straight))  # adapter-only
    resumed, spy = run(path)  # 3 of 4 warmup steps done
    assert len(uninterrupted.rates) == 8 and spy.rates == uninterrupted.rates[3:]
    assert _equal(_trainable(resumed), _trainable(straight))


# ---------------------------------------------------------------------------------------------- PrecisionMonitor
@pytest.mark.parametrize(("kind", "arch", "accumulate"), CASES)
def test_precision_monitor_watches_the_adapter_gradients_only(tmp_path, kind, arch, accumulate):
    module = _module(kind, arch)
    monitor, spy = PrecisionMonitor(policy="stop", log_every_n_steps=1), Spy()
    trainer = _fit(module, tmp_path, [monitor, spy], max_steps=4, accumulate_grad_batches=accumulate)
    assert trainer.global_step == 4 and monitor.stop_reason is None  # frozen weights without grads are no anomaly
    assert monitor.skipped_steps == 0 and monitor.nonfinite_events == 0
    assert not spy.frozen_with_grads
    assert len(spy.norms) == 4 and all(norm is not None and norm > 0 for norm in spy.norms)
    logged = float(trainer.callback_metrics["precision/grad_norm"])
    assert logged == pytest.approx(spy.norms[-1], rel=1e-5)  # the norm of the adapters' gradients


@pytest.mark.parametrize(
    ("kind", "arch", "accumulate", "policy"),
    [
        pytest.param("sft", "llama", 2, "skip", id="sft-llama-accumulate2-skip"),
        pytest.param("distillation", "gpt2", 1, "stop", id="distillation-gpt2-stop"),
    ],
)
def test_precision_monitor_keeps_a_nan_loss_out_of_the_adapters(tmp_path, kind, arch, accumulate, policy):
    module = _module(kind, arch, faulty=True)
    module.nan_loss_at = frozenset({2})  # in optimizer step `bad`
    bad = 2 // accumulate
    module.configure_model()
    frozen = _frozen(module)
    monitor, decay, spy = PrecisionMonitor(policy=policy), LRDecay("constant"), Spy()
    trainer = _fit(module, tmp_path, [monitor, decay, spy], max_steps=4, accumulate_grad_batches=accumulate)
    assert monitor.nonfinite_events == 1 and monitor.skipped_steps == 1
    assert _equal(spy.weights[bad + 1], spy.weights[bad])  # the adapters stay as they were
    assert all(torch.isfinite(w).all() for weights in spy.weights for w in weights.values())
    assert _equal(_frozen(module), frozen)  # the base too
    if policy == "skip":
        assert trainer.global_step == 4 and decay.steps == {0: 3}  # the dropped step does not count
        assert not _equal(spy.weights[-1], spy.weights[bad + 1])  # training went on
    else:
        assert trainer.global_step == bad + 1 and "stopping" in monitor.stop_reason  # stopped after that step


def test_precision_monitor_counts_fp16_overflows_in_the_adapter_gradients(tmp_path):
    """Lightning's 16-mixed with a CPU GradScaler: an inf in an adapter gradient is skipped by the scaler."""
    from lightning.pytorch.plugins import MixedPrecision

    class InfGradient(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.fit_loop.epoch_loop.batch_idx == 1:
                next(p for n, p in pl_module.named_parameters() if "lora_B" in n).grad[0, 0] = float("inf")

    module = _module("sft", "gpt2")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10_000)
    monitor, spy = PrecisionMonitor(policy="warn", log_every_n_steps=1), Spy()
    trainer = _fit(
        module,
        tmp_path,
        [InfGradient(), monitor, spy],
        max_steps=3,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert monitor.skipped_steps == 1 and monitor.nonfinite_events == 1 and len(spy.rates) == 2
    assert _equal(spy.weights[2], spy.weights[1]) and not _equal(spy.weights[3], spy.weights[2])
    assert scaler.get_scale() == 512.0 and float(trainer.callback_metrics["precision/loss_scale"]) == 512.0
    assert float(trainer.callback_metrics["precision/skipped_steps"]) == 1.0


# ---------------------------------------------------------------------------------------------- EarlyStopping
def test_early_stopping_copies_only_the_adapters_so_checkpoints_stay_adapter_only(tmp_path):
    module = _module("sft", "gpt2")
    stopper = EarlyStopping("val/loss", patience=5)
    checkpoints = ModelCheckpoint(tmp_path / "checkpoints", save_top_k=-1, every_n_train_steps=2)
    _fit(module, tmp_path, [stopper, checkpoints], max_steps=4, val_check_interval=2, limit_val_batches=1,
         num_sanity_val_steps=0, enable_checkpointing=True)  # fmt: skip
    assert set(stopper.best_weights) == set(_trainable(module))  # the adapters: the base is frozen
    checkpoint = torch.load(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("lit_bigmodel.EarlyStopping")]
    assert set(state["best_weights"]) == set(checkpoint["state_dict"])  # no copy of the frozen base


@pytest.mark.parametrize(
    ("kind", "arch", "accumulate"),
    [
        pytest.param("sft", "llama", 1, id="sft-llama"),
        pytest.param("distillation", "gpt2", 2, id="distillation-gpt2-accumulate2"),
    ],
)
def test_early_stopping_resumed_from_an_adapter_only_checkpoint_equals_the_uninterrupted_run(
    tmp_path, kind, arch, accumulate
):
    def run(ckpt_path=None):
        module = _module(kind, arch)
        stopper = EarlyStopping("val/loss", patience=2)
        checkpoints = ModelCheckpoint(tmp_path / "checkpoints", filename="{epoch}", save_top_k=-1)
        trainer = _fit(module, tmp_path, [stopper, checkpoints], ckpt_path, max_epochs=12,
                       limit_train_batches=2 * accumulate, accumulate_grad_batches=accumulate, limit_val_batches=1,
                       num_sanity_val_steps=0, enable_checkpointing=True)  # fmt: skip
        return module, stopper, trainer

    straight, stopper, trainer = run()
    assert 0 < stopper.stopped_epoch < 11 and trainer.current_epoch < 12  # stopped early
    checkpoint = torch.load(tmp_path / "checkpoints" / "epoch=1.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == set(_trainable(straight))  # adapter-only, the stopper's state beside
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("lit_bigmodel.EarlyStopping")]
    assert set(state["best_weights"]) == set(checkpoint["state_dict"])
    best = torch.load(tmp_path / "checkpoints" / f"epoch={stopper.best_epoch}.ckpt", weights_only=False)
    assert _equal(_trainable(straight), best["state_dict"])  # the best weights were put back

    resumed, resumed_stopper, resumed_trainer = run(tmp_path / "checkpoints" / "epoch=1.ckpt")
    assert resumed_stopper.stopped_epoch == stopper.stopped_epoch
    assert resumed_trainer.global_step == trainer.global_step
    assert (resumed_stopper.best_epoch, resumed_stopper.best_step) == (stopper.best_epoch, stopper.best_step)
    assert float(resumed_stopper.best_score) == float(stopper.best_score)
    assert _equal(_trainable(resumed), _trainable(straight))
    assert _equal(_frozen(resumed), _frozen(straight))


# ---------------------------------------------------------------------------------------------- Pruning
@pytest.mark.parametrize("kind", ["sft", "distillation"])
def test_pruning_refuses_adapters_and_names_the_alternative(tmp_path, kind):
    module = _module(kind, "llama")
    pruning = Pruning("unstructured", final_sparsity=0.5, schedule="one_shot")
    with pytest.raises(
        ConfigurationError, match=r"`peft` must be None.*got LoraConfig.*Prune after merging: export the merged model"
    ):
        _fit(module, tmp_path, [pruning], max_steps=2)
    assert module.model is None  # refused in setup, before the network was built


def test_pruning_refuses_a_network_with_peft_layers():
    module = _module("sft", "gpt2")
    module.configure_model()
    with pytest.raises(
        ConfigurationError,
        match=r"peft adapter layers \(transformer\.h\.0\.attn\.c_attn, .* more\).*Prune after merging",
    ):
        Pruning(final_sparsity=0.5).prune_module(module.model)


def test_pruning_the_merged_export_keeps_its_zeros(tmp_path):
    """The alternative the error names: train adapters, export merged, then prune that with no `peft`."""
    module = _module("sft", "llama")
    _fit(module, tmp_path / "adapters", [], max_steps=2)
    module.export(tmp_path / "merged")
    L.seed_everything(0)
    merged = SFTModule(str(tmp_path / "merged"), learning_rate=LR)
    pruning = Pruning("unstructured", final_sparsity=0.5, schedule="one_shot")
    _fit(merged, tmp_path / "pruned", [pruning], max_steps=2)
    merged.export(tmp_path / "pruned")
    network = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for name, layer in network.named_modules():
        if isinstance(layer, torch.nn.Linear):
            zeros = float((layer.weight == 0).float().mean())
            assert math.isclose(zeros, 0.5, abs_tol=1 / layer.weight.numel()), name
