"""LRDecay: closed forms per schedule (with and without accumulation), skipped fp16 steps, resume mid-warmup,
plateau against torch's ReduceLROnPlateau, manual optimization (two optimizers, SeqGAN), who owns the rate
(SFTModule / DistillationModule at their defaults, a module's own scheduler), SFTModule's built-in schedule,
plot, errors."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lit_bigmodel import ConfigurationError
from lit_bigmodel.callbacks import LRDecay, PrecisionMonitor
from lit_bigmodel.schedules import LRSchedule
from tests.conftest import tiny_trainer

BASE_LRS = (0.1, 0.2)  # the module's two param groups
SCALES = (1.0, 0.5)


class Regression(L.LightningModule):
    """A Linear(4, 1) with two param groups; records the rates each *real* optimizer step used."""

    def __init__(self, inf_at: tuple[int, ...] = (), log_metric: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.inf_at, self.log_metric = set(inf_at), log_metric
        self.used: list[list[float]] = []  # rates of every real step, per group
        self.batches = 0

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).pow(2).mean()

    def on_after_backward(self):
        self.batches += 1
        if self.batches - 1 in self.inf_at:  # overflow, before the GradScaler unscales
            self.lin.weight.grad[0, 0] = float("inf")

    def validation_step(self, batch, batch_idx):
        self.log("val_metric", self.log_metric[self.current_epoch])

    def configure_optimizers(self):
        groups = [{"params": [self.lin.weight], "lr": BASE_LRS[0]}, {"params": [self.lin.bias], "lr": BASE_LRS[1]}]
        optimizer = torch.optim.SGD(groups, momentum=0.9)
        optimizer.register_step_post_hook(lambda opt, *_: self.used.append([g["lr"] for g in opt.param_groups]))
        return optimizer


def _data(n=64):
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(0))), batch_size=2)


def _closed_form(schedule, t, a0, *, W=0, T=None, min_lr=0.0, gamma=None, s=None, beta=None, p=1.0, S=None, shape=None):
    """The textbook formulas, written independently of lit_bigmodel/schedules.py."""
    if t < W:
        return a0 * (t + 1) / W
    tau = t - W
    if schedule == "constant":
        return a0
    if schedule == "step":
        return max(min_lr, a0 * gamma ** math.floor(tau / s))
    if schedule == "exponential":
        return max(min_lr, a0 * gamma ** (tau / s))
    if schedule == "inverse_time":
        return max(min_lr, a0 / (1 + beta * tau / s) ** p)
    if schedule == "cosine":
        return min_lr + (a0 - min_lr) * 0.5 * (1 + math.cos(math.pi * min(tau, T - W) / (T - W)))
    if schedule == "linear":
        return a0 + (min_lr - a0) * min(tau, T - W) / (T - W)
    if schedule == "wsd":
        if t < S:
            return a0
        x = min(t - S, T - S) / (T - S)
        left = {"linear": 1 - x, "cosine": 0.5 * (1 + math.cos(math.pi * x)), "1-sqrt": 1 - math.sqrt(x)}[shape]
        return min_lr + (a0 - min_lr) * left
    raise AssertionError(schedule)


# (LRDecay arguments, closed-form arguments); max_steps = 12 optimizer steps
CASES = {
    "constant": ({"warmup_steps": 3}, {"W": 3}),
    "step": ({"warmup_steps": 2, "decay_rate": 0.5, "decay_steps": 3}, {"W": 2, "gamma": 0.5, "s": 3}),
    "exponential": (
        {"warmup_steps": 2, "decay_rate": 0.5, "decay_steps": 4, "min_lr": 0.02},
        {"W": 2, "gamma": 0.5, "s": 4, "min_lr": 0.02},
    ),
    "inverse_time": (
        {"warmup_steps": 2, "decay_rate": 0.5, "power": 0.5},
        {"W": 2, "beta": 0.5, "s": 1, "p": 0.5},
    ),
    "cosine": ({"warmup_steps": 3, "min_lr": 0.01}, {"W": 3, "T": 12, "min_lr": 0.01}),  # total from the Trainer
    "linear": ({"warmup_steps": 3, "total_steps": 10}, {"W": 3, "T": 10}),  # past total_steps: min_lr
    "wsd": (
        {"warmup_steps": 2, "decay_start": 0.5, "decay_shape": "1-sqrt", "min_lr": 0.001},
        {"W": 2, "T": 12, "S": 6, "shape": "1-sqrt", "min_lr": 0.001},
    ),
}


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("schedule", list(CASES))
def test_each_schedule_equals_its_closed_form(tmp_path, schedule, accumulate):
    kwargs, formula = CASES[schedule]
    module = Regression()
    trainer = tiny_trainer(
        tmp_path,
        max_steps=12,
        accumulate_grad_batches=accumulate,
        callbacks=[LRDecay(schedule, group_scales=list(SCALES), **kwargs)],
    )
    trainer.fit(module, _data())
    assert len(module.used) == 12  # optimizer steps: accumulation does not shorten the warmup
    for t in range(12):
        for g in (0, 1):
            expected = SCALES[g] * _closed_form(schedule, t, BASE_LRS[g], **formula)
            assert module.used[t][g] == pytest.approx(expected, rel=1e-12, abs=1e-15), (t, g)
    assert float(trainer.callback_metrics["lr/opt0/group1"]) == pytest.approx(module.used[-1][1], rel=1e-6)


def test_an_overflow_skipped_by_the_fp16_grad_scaler_does_not_advance_the_schedule(tmp_path):
    """Lightning's 16-mixed with an explicit CPU GradScaler: real fp16 autocast, real scaler skips."""
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=10_000)
    module = Regression(inf_at=(2, 3, 7))
    monitor = PrecisionMonitor(policy="warn")
    trainer = tiny_trainer(
        tmp_path,
        max_steps=10,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[LRDecay("linear", warmup_steps=4, total_steps=10), monitor],
    )
    with pytest.warns(UserWarning, match="non-finite gradients"):
        trainer.fit(module, _data())
    assert trainer.global_step == 10  # Lightning counts the attempts ...
    assert len(module.used) == 7  # ... the optimizer stepped 7 times
    assert monitor.skipped_steps == 3 and monitor.nonfinite_events == 3
    assert scaler.get_scale() == 8.0 / 2**3
    expected = [_closed_form("linear", t, BASE_LRS[0], W=4, T=10) for t in range(7)]
    assert [lrs[0] for lrs in module.used] == pytest.approx(expected, rel=1e-12)


def test_resume_mid_warmup_gives_the_lr_sequence_of_an_uninterrupted_run(tmp_path):
    def run(ckpt_path=None):
        module = Regression()
        directory = tmp_path / ("resumed" if ckpt_path else "ckpt")
        checkpoints = ModelCheckpoint(directory, filename="{step}", every_n_train_steps=3, save_top_k=-1)
        trainer = tiny_trainer(
            tmp_path,
            max_steps=12,
            accumulate_grad_batches=2,
            enable_checkpointing=True,
            callbacks=[LRDecay("cosine", warmup_steps=6, group_scales=list(SCALES)), checkpoints],
        )
        trainer.fit(module, _data(), ckpt_path=ckpt_path)
        return module.used

    uninterrupted = run()
    resumed = run(tmp_path / "ckpt" / "step=3.ckpt")  # 3 of 6 warmup steps done; the optimizer holds 3/6 · α0
    assert len(uninterrupted) == 12 and len(resumed) == 9
    assert resumed == uninterrupted[3:]  # exactly


def test_plateau_matches_torch_reduce_lr_on_plateau(tmp_path):
    metric = (5.0, 4.0, 4.0, 3.95, 4.1, 3.0, 3.0, 3.0, 3.0, 3.0)
    settings = {"factor": 0.3, "patience": 1, "cooldown": 1, "min_lr": 0.02}
    module = Regression(log_metric=metric)
    decay = LRDecay("plateau", monitor="val_metric", min_delta=0.1, **settings)
    trainer = tiny_trainer(
        tmp_path, max_epochs=len(metric), limit_train_batches=2, limit_val_batches=1, callbacks=[decay]
    )
    trainer.fit(module, _data(), _data(2))

    reference_optimizer = torch.optim.SGD([torch.zeros(1)], lr=BASE_LRS[0])
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        reference_optimizer, threshold=0.1, threshold_mode="abs", **settings
    )
    expected_first_steps = []
    for value in metric:
        expected_first_steps.append(reference_optimizer.param_groups[0]["lr"])
        reference.step(value)
    assert [module.used[2 * e][0] for e in range(len(metric))] == pytest.approx(expected_first_steps, rel=1e-12)
    assert decay.reductions == 2 and module.used[-1][0] == 0.02  # reductions, cooldown and the floor

    restored = LRDecay("plateau", monitor="val_metric", **settings)
    restored.load_state_dict(decay.state_dict())
    assert (restored.best, restored.wait, restored.cooldown_counter, restored.reductions) == (
        decay.best,
        decay.wait,
        decay.cooldown_counter,
        decay.reductions,
    )


def test_plateau_without_the_monitored_metric_names_it(tmp_path):
    trainer = tiny_trainer(
        tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[LRDecay("plateau", monitor="nope")]
    )
    with pytest.raises(ConfigurationError, match="`monitor` 'nope' was not logged"):
        trainer.fit(Regression(), _data())


class TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers (a GAN's shape); optimizer 1 overflows on some batches."""

    def __init__(self, inf_at=()):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        self.inf_at = set(inf_at)
        self.used: dict[int, list[float]] = {0: [], 1: []}

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        for index, (net, opt) in enumerate(((self.a, opt_a), (self.b, opt_b))):
            opt.zero_grad()
            self.manual_backward(net(batch[0]).pow(2).mean())
            if index == 1 and batch_idx in self.inf_at:
                net.weight.grad[0, 0] = float("nan")
            opt.step()

    def configure_optimizers(self):
        optimizers = [torch.optim.Adam(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.1)]
        for i, opt in enumerate(optimizers):
            opt.register_step_post_hook(lambda o, *_, i=i: self.used[i].append(o.param_groups[0]["lr"]))
        return optimizers


def test_manual_optimization_two_optimizers_with_a_grad_scaler_keep_their_own_counters(tmp_path):
    module = TwoOptimizers(inf_at=(1, 4))
    decay = LRDecay("inverse_time", warmup_steps=2, decay_rate=0.5)
    monitor = PrecisionMonitor(policy="skip")
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=8,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=8.0))],
        callbacks=[decay, monitor],
    )
    trainer.fit(module, _data())
    assert decay.steps == {0: 8, 1: 6} and monitor.skipped_steps == 2
    for index, a0 in ((0, 0.01), (1, 0.1)):
        expected = [_closed_form("inverse_time", t, a0, W=2, beta=0.5, s=1) for t in range(decay.steps[index])]
        assert module.used[index] == pytest.approx(expected, rel=1e-12)


def test_seqgan_manual_optimization_schedules_generator_and_discriminator(tmp_path):
    from lit_bigmodel import SeqGANModule
    from lit_bigmodel.datamodules import OracleDataModule
    from lit_bigmodel.nets import CNNDiscriminator, LSTMGenerator

    L.seed_everything(0)
    module = SeqGANModule(
        LSTMGenerator(5000, 8, 8, 6),
        CNNDiscriminator(5000, 8, (1, 2), (4, 4)),
        mle_epochs=1, d_pretrain_rounds=1, d_epochs=1, adv_epochs=1, d_steps=1, rollout_num=2, nll_samples=0,
    )  # fmt: skip
    decay = LRDecay("exponential", warmup_steps=2, decay_rate=0.5, decay_steps=2)
    spy = StepSpy()
    trainer = tiny_trainer(tmp_path, max_epochs=-1, callbacks=[spy, decay])  # spy first: its hook sees the rate used
    trainer.fit(module, OracleDataModule("random", num_sequences=48, seq_len=6, batch_size=8))
    assert spy.steps[0] == 6 + 1  # G: 6 MLE steps (one epoch of 6 batches) + 1 policy-gradient step
    assert decay.steps == {0: spy.steps[0], 1: spy.steps[1]} and spy.steps[1] >= 12  # D: 2 epochs of D steps
    for index, a0 in ((0, 0.01), (1, 1e-4)):
        expected = [_closed_form("exponential", t, a0, W=2, gamma=0.5, s=2) for t in range(spy.steps[index])]
        assert spy.used[index] == pytest.approx(expected, rel=1e-12)


class StepSpy(L.Callback):
    """Records, independently of LRDecay, the rate of every step of every optimizer."""

    def on_train_start(self, trainer, pl_module):
        self.steps, self.used = {}, {}
        for i, optimizer in enumerate(trainer.optimizers):
            self.steps[i], self.used[i] = 0, []
            optimizer.register_step_post_hook(lambda opt, *_, i=i: self._record(i, opt))

    def _record(self, index, optimizer):
        self.steps[index] += 1
        self.used[index].append(optimizer.param_groups[0]["lr"])


def _arithmetic():
    from lit_bigmodel.datamodules import ArithmeticDataModule

    return ArithmeticDataModule(max_operand=12, num_val=8, num_test=8, batch_size=8, eval_batch_size=8, seed=3)


def _gpt2(n_layer):
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


def _default_module(kind):
    """SFTModule / DistillationModule with every optimization argument at its default (warmup_steps=0.05)."""
    from lit_bigmodel import DistillationModule, SFTModule

    return SFTModule(_gpt2(2)) if kind == "sft" else DistillationModule(_gpt2(1), _gpt2(2))


# 20 optimizer steps: the modules' default warmup (5 % of the run) is one step, so a module scheduler
# would have scaled the optimizer's rate by 1/2 before LRDecay read it.
OWNED = {
    "exponential": ({"warmup_steps": 2, "decay_rate": 0.5, "decay_steps": 4}, {"W": 2, "gamma": 0.5, "s": 4}),
    "inverse_time": ({"decay_rate": 0.5, "power": 2.0}, {"beta": 0.5, "s": 1, "p": 2.0}),  # α0 / (1 + βt)^γ
}


@pytest.mark.parametrize("schedule", list(OWNED))
@pytest.mark.parametrize("kind", ["sft", "distillation"])
def test_lr_decay_owns_the_rate_of_the_modules_at_their_defaults(tmp_path, kind, schedule):
    L.seed_everything(0)
    kwargs, formula = OWNED[schedule]
    module = _default_module(kind)
    decay, spy = LRDecay(schedule, **kwargs), StepSpy()
    trainer = tiny_trainer(tmp_path, max_steps=20, limit_val_batches=0, callbacks=[spy, decay])
    trainer.fit(module, _arithmetic())
    groups = trainer.optimizers[0].param_groups
    assert decay.initial_lrs[0] == [module.learning_rate] * len(groups) == [5e-5] * len(groups)
    expected = [_closed_form(schedule, t, 5e-5, **formula) for t in range(21)]
    assert spy.steps[0] == 20
    assert spy.used[0] == pytest.approx(expected[:20], rel=1e-12)
    assert [g["lr"] for g in groups] == pytest.approx([expected[20]] * len(groups), rel=1e-12)  # after fit
    assert trainer.lr_scheduler_configs == []  # the callback owns the rate: the module installs no scheduler


class OwnScheduler(Regression):
    """A user's module that returns its own per-step scheduler (×0.1, then halving every step)."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 * 0.5**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_module_scheduler_neither_scales_the_base_rate_nor_has_the_last_word(tmp_path, accumulate):
    module = OwnScheduler()
    decay = LRDecay("exponential", warmup_steps=2, decay_rate=0.5, decay_steps=4)
    trainer = tiny_trainer(tmp_path, max_steps=12, accumulate_grad_batches=accumulate, callbacks=[decay])
    with pytest.warns(UserWarning, match="scheduler is overridden"):
        trainer.fit(module, _data())
    assert decay.initial_lrs[0] == list(BASE_LRS)  # the group's `initial_lr`, not the scheduler's 0.1 × α0
    for t in range(12):
        for g in (0, 1):
            expected = _closed_form("exponential", t, BASE_LRS[g], W=2, gamma=0.5, s=4)
            assert module.used[t][g] == pytest.approx(expected, rel=1e-12), (t, g)
    after = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert after == pytest.approx([_closed_form("exponential", 12, a0, W=2, gamma=0.5, s=4) for a0 in BASE_LRS])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sft_without_lr_decay_follows_its_built_in_warmup_and_cosine(tmp_path, accumulate):
    from lit_bigmodel import SFTModule

    L.seed_everything(0)
    module = SFTModule(_gpt2(2), learning_rate=1e-3, warmup_steps=3, min_lr_ratio=0.1)
    spy = StepSpy()
    trainer = tiny_trainer(
        tmp_path, max_steps=12, accumulate_grad_batches=accumulate, limit_val_batches=0, callbacks=[spy]
    )
    trainer.fit(module, _arithmetic())
    assert spy.steps[0] == 12  # optimizer steps: accumulation does not shorten the warmup
    expected = [_closed_form("cosine", t, 1e-3, W=3, T=12, min_lr=1e-4) for t in range(12)]
    assert expected[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warmup (t + 1) / W
    assert spy.used[0] == pytest.approx(expected, rel=1e-9)
    schedule = LRSchedule("cosine", warmup_steps=3, total_steps=12, min_lr=1e-4)
    assert spy.used[0] == pytest.approx([schedule.lr(t, 1e-3) for t in range(12)], rel=1e-9)


def test_who_owns_the_rate_is_asked_per_optimizer():
    from lit_bigmodel.schedules import callback_sets_learning_rate

    only_second = SimpleNamespace(callbacks=[LRDecay("cosine", optimizers=[1])])
    assert callback_sets_learning_rate(only_second, 1)
    assert not callback_sets_learning_rate(only_second, 0)
    every = SimpleNamespace(callbacks=[PrecisionMonitor(), LRDecay("cosine")])
    assert callback_sets_learning_rate(every, 0) and callback_sets_learning_rate(every, 3)
    assert not callback_sets_learning_rate(SimpleNamespace(callbacks=[PrecisionMonitor()]), 0)


def test_plot_draws_the_closed_form(tmp_path):
    pytest.importorskip("matplotlib")
    decay = LRDecay("wsd", warmup_steps=10, decay_start=60, decay_shape="cosine", group_scales=[1.0, 0.1])
    figure = decay.plot(total_steps=100, base_lr=3e-4, path=str(tmp_path / "lr.png"))
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2 and (tmp_path / "lr.png").stat().st_size > 0
    expected = [_closed_form("wsd", t, 3e-4, W=10, T=100, S=60, shape="cosine") for t in range(100)]
    assert list(lines[0].get_ydata()) == pytest.approx(expected, rel=1e-12)
    assert list(lines[1].get_ydata()) == pytest.approx([0.1 * x for x in expected], rel=1e-12)


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match="pip install matplotlib"):
        LRDecay("cosine").plot(total_steps=10)


def test_a_run_of_unknown_length_needs_total_steps(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=-1, max_steps=-1, callbacks=[LRDecay("cosine")])
    with pytest.raises(ConfigurationError, match="`total_steps` is needed"):
        trainer.fit(Regression(), _data())


def test_group_scales_must_match_the_param_groups(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=2, callbacks=[LRDecay("constant", group_scales=[1.0, 0.5, 0.1])])
    with pytest.raises(ConfigurationError, match="`group_scales` has 3 factors"):
        trainer.fit(Regression(), _data())


def test_two_instances_have_distinct_state_keys():
    assert LRDecay("cosine").state_key != LRDecay("cosine", optimizers=[1]).state_key
    assert LRDecay("cosine").state_key != LRDecay("linear").state_key


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"schedule": "polynomial"}, "schedule"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"total_steps": 0}, "total_steps"),
        ({"min_lr": -1e-3}, "min_lr"),
        ({"schedule": "exponential", "decay_steps": 10}, "decay_rate"),
        ({"schedule": "step", "decay_rate": 1.5, "decay_steps": 10}, "decay_rate"),
        ({"schedule": "exponential", "decay_rate": 0.5}, "decay_steps"),
        ({"schedule": "inverse_time", "decay_rate": 0.5, "decay_steps": 0}, "decay_steps"),
        ({"power": 0.0}, "power"),
        ({"decay_start": 1.5}, "decay_start"),
        ({"decay_shape": "sqrt"}, "decay_shape"),
        ({"schedule": "plateau"}, "monitor"),
        ({"mode": "maximum"}, "mode"),
        ({"factor": 1.0}, "factor"),
        ({"patience": -1}, "patience"),
        ({"cooldown": -2}, "cooldown"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"group_scales": [1.0, 0.0]}, "group_scales"),
        ({"optimizers": [0, 0]}, "optimizers"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        LRDecay(**kwargs)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigurationError, match=r"`warmup_steps`.*`min_lr`.*`factor`"):
        LRDecay("cosine", warmup_steps=-1, min_lr=-1.0, factor=2.0)
