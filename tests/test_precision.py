"""Precision: auto_precision's choice per device, PrecisionMonitor's loss scale / skipped steps / unscaled grad norm,
the warn / skip / stop policies, DeepSpeed's loss scale (a stand-in), errors, and the real fp16 path on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lit_bigmodel import ConfigurationError
from lit_bigmodel.callbacks import LRDecay, PrecisionChoice, PrecisionMonitor, auto_precision
from lit_bigmodel.callbacks._steps import torch_optimizer, watch_real_steps
from lit_bigmodel.callbacks.precision import loss_scale
from tests.conftest import tiny_trainer


class Regression(L.LightningModule):
    """Linear(4, 1) with SGD; injects inf gradients (``inf_at``) or a NaN loss (``nan_loss_at``) at batch indices."""

    def __init__(self, inf_at=(), nan_loss_at=()):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.inf_at, self.nan_loss_at = set(inf_at), set(nan_loss_at)
        self.weights: list[torch.Tensor] = []  # after every batch
        self.scaled_norms: list[float] = []  # before the GradScaler unscaled
        self.norms: list[float] = []  # what the optimizer sees

    def training_step(self, batch, batch_idx):
        loss = self.lin(batch[0]).float().pow(2).mean()
        return loss * float("nan") if batch_idx in self.nan_loss_at else loss

    def on_after_backward(self):
        if self.trainer.fit_loop.epoch_loop.batch_idx in self.inf_at:
            self.lin.weight.grad[0, 0] = float("inf")
        self.scaled_norms.append(_norm(self.parameters()))

    def on_before_optimizer_step(self, optimizer):  # after the callbacks' hook of the same name
        self.norms.append(_norm(self.parameters()))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights.append(self.lin.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _norm(parameters) -> float:
    grads = [p.grad for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def _data():
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=torch.Generator().manual_seed(0))), batch_size=2)


def _fp16_cpu(init_scale=1024.0):
    """Lightning's 16-mixed on CPU, with an explicit GradScaler ('16-mixed' alone becomes bf16 on CPU)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


# ---------------------------------------------------------------------------- auto_precision
def test_auto_precision_on_this_cpu_says_why():
    choice = auto_precision("cpu")
    assert isinstance(choice, PrecisionChoice) and str(choice) == choice.precision
    assert choice.precision in ("bf16-mixed", "32-true") and "CPU" in choice.reason


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"), ((7, 5), "16-mixed"), ((3, 7), "32-true")],
)
def test_auto_precision_by_gpu_generation(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    choice = auto_precision()
    assert choice.precision == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason


def test_auto_precision_on_a_cpu_without_bf16_units_keeps_fp32(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert auto_precision("cpu").precision == "32-true"
    assert auto_precision("mps").precision == "32-true"


# ---------------------------------------------------------------------------- the step mechanism, torch only
def test_watch_real_steps_ignores_steps_the_grad_scaler_skips():
    """torch.amp.GradScaler('cpu') driven directly: an inf gradient makes scaler.step skip optimizer.step()."""
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    steps = []
    watch_real_steps(optimizer, lambda: steps.append(1))
    for i in range(5):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(2, 4)).pow(2).mean()).backward()
        if i in (1, 3):
            model.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
    assert len(steps) == 3 and scaler.get_scale() == 4.0
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()  # no gradients: nothing updated, not a step
    assert len(steps) == 3


# ---------------------------------------------------------------------------- PrecisionMonitor under fp16
def test_monitor_logs_scale_skips_and_the_unscaled_grad_norm(tmp_path):
    module = Regression(inf_at=(2,))
    monitor = PrecisionMonitor(policy="warn", log_every_n_steps=1)
    trainer = tiny_trainer(tmp_path, max_steps=6, plugins=[_fp16_cpu(1024.0)], callbacks=[monitor])
    with pytest.warns(UserWarning, match=r"non-finite gradients at step 2 .*GradScaler skips this step"):
        trainer.fit(module, _data())
    metrics = trainer.callback_metrics
    assert monitor.skipped_steps == 1 and float(metrics["precision/skipped_steps"]) == 1.0
    assert float(metrics["precision/loss_scale"]) == 512.0  # halved once
    # the logged norm is the unscaled one that the optimizer saw, i.e. the scaled one / scale (not unscaled twice)
    assert float(metrics["precision/grad_norm"]) == pytest.approx(module.norms[-1], rel=1e-5)
    assert module.norms[-1] == pytest.approx(module.scaled_norms[-1] / 512.0, rel=1e-5)


def test_stop_policy_stops_at_a_nan_loss_with_finite_weights(tmp_path):
    module = Regression(nan_loss_at=(3,))
    monitor = PrecisionMonitor(policy="stop")
    trainer = tiny_trainer(tmp_path, max_steps=10, callbacks=[monitor])
    with pytest.warns(UserWarning, match="non-finite loss and gradients at step 3"):
        trainer.fit(module, _data())
    assert trainer.global_step == 4 and len(module.weights) == 4  # stopped after the bad batch
    assert monitor.stop_reason is not None and "stopping" in monitor.stop_reason
    assert torch.equal(module.weights[3], module.weights[2]) and torch.isfinite(module.weights[3]).all()


def test_skip_policy_drops_the_step_and_the_schedule_does_not_advance(tmp_path):
    module = Regression(inf_at=(1, 4))
    monitor = PrecisionMonitor(policy="skip")
    decay = LRDecay("linear", total_steps=20)
    trainer = tiny_trainer(tmp_path, max_steps=8, callbacks=[monitor, decay])
    trainer.fit(module, _data())  # fp32: no GradScaler, only the policy protects the weights
    assert monitor.skipped_steps == 2 and monitor.nonfinite_events == 2
    assert decay.steps == {0: 6}
    assert torch.equal(module.weights[1], module.weights[0]) and torch.equal(module.weights[4], module.weights[3])
    assert all(torch.isfinite(w).all() for w in module.weights)


def test_warn_policy_leaves_the_step_alone_without_a_scaler(tmp_path):
    module = Regression(inf_at=(1,))
    trainer = tiny_trainer(tmp_path, max_steps=3, callbacks=[PrecisionMonitor(policy="warn")])
    with pytest.warns(UserWarning, match="non-finite gradients at step 1"):
        trainer.fit(module, _data())
    assert not torch.isfinite(module.weights[1]).all()  # "warn" only warns


def test_checks_happen_every_n_steps_while_skips_are_counted_at_every_step(tmp_path):
    monitor = PrecisionMonitor(policy="warn", check_every_n_steps=3)
    trainer = tiny_trainer(tmp_path, max_steps=7, plugins=[_fp16_cpu()], callbacks=[monitor])
    with pytest.warns(UserWarning, match="at step 3 "):
        trainer.fit(Regression(inf_at=(1, 3)), _data())  # step 1 is not checked (documented), step 3 is
    assert monitor.nonfinite_events == 1 and monitor.skipped_steps == 2


def test_state_survives_a_checkpoint_and_keys_are_distinct():
    monitor = PrecisionMonitor(policy="stop")
    monitor.skipped_steps, monitor.nonfinite_events = 7, 3
    restored = PrecisionMonitor(policy="stop")
    restored.load_state_dict(monitor.state_dict())
    assert (restored.skipped_steps, restored.nonfinite_events) == (7, 3)
    assert PrecisionMonitor("warn").state_key != PrecisionMonitor("stop").state_key


# ---------------------------------------------------------------------------- DeepSpeed, through a stand-in
def test_deepspeed_loss_scale_and_wrapped_optimizer_are_read_from_the_engine():
    """DeepSpeed is not installed here: a stand-in with the attributes DeepSpeed's fp16 optimizers expose."""
    inner = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    fp16_optimizer = SimpleNamespace(optimizer=inner, cur_scale=4096.0, param_groups=inner.param_groups)
    engine = SimpleNamespace(optimizer=fp16_optimizer, skipped_steps=5)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), strategy=SimpleNamespace(deepspeed_engine=engine))
    assert loss_scale(trainer) == 4096.0
    assert torch_optimizer(fp16_optimizer) is inner
    with pytest.raises(ConfigurationError, match="`policy`='skip' is not available under DeepSpeed"):
        PrecisionMonitor(policy="skip").setup(trainer, None, "fit")
    assert loss_scale(SimpleNamespace(precision_plugin=SimpleNamespace(), strategy=SimpleNamespace())) is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"policy": "ignore"}, "policy"),
        ({"check_every_n_steps": 0}, "check_every_n_steps"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        PrecisionMonitor(**kwargs)


# ---------------------------------------------------------------------------- the real thing
@pytest.mark.gpu
def test_fp16_overflow_on_cuda_is_counted_and_does_not_advance_the_schedule(tmp_path):
    module = Regression(inf_at=(2, 5))
    monitor, decay = PrecisionMonitor(policy="warn", log_every_n_steps=1), LRDecay("linear", total_steps=20)
    trainer = tiny_trainer(tmp_path, accelerator="cuda", precision="16-mixed", max_steps=8, callbacks=[monitor, decay])
    with pytest.warns(UserWarning, match="non-finite gradients"):
        trainer.fit(module, _data())
    assert monitor.skipped_steps == 2 and decay.steps == {0: 6}
    assert trainer.precision_plugin.scaler is not None
    assert float(trainer.callback_metrics["precision/loss_scale"]) == trainer.precision_plugin.scaler.get_scale()
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 6 / 20))
