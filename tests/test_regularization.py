"""`L1L2` (penalties added to the gradients at each optimizer step) and the shared no-decay rule (`decay_groups`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lit_bigmodel import DistillationModule, SeqGANModule, SFTModule
from lit_bigmodel.callbacks.regularization import L1L2
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.nets import CNNDiscriminator, LSTMGenerator
from lit_bigmodel.optim import decay_groups

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the no-decay rule
def _group_names(model: nn.Module, weight_decay: float = 0.1) -> tuple[set[str], set[str]]:
    """Names (every alias of a tied parameter) in the decay and the no-decay group of ``decay_groups``."""
    names: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    groups = {group["weight_decay"]: group["params"] for group in decay_groups([model], weight_decay)}
    decay, no_decay = ({n for p in groups.get(wd, []) for n in names[id(p)]} for wd in (weight_decay, 0.0))
    return decay, no_decay


class _HeadFirst(nn.Module):
    """An output layer declared before the embedding it is tied to."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 10, bias=False)
        self.embed = nn.Embedding(10, 4)
        self.head.weight = self.embed.weight


def test_a_tied_embedding_is_not_decayed_whichever_module_comes_first():
    decay, no_decay = _group_names(_HeadFirst())
    assert decay == set() and no_decay == {"head.weight", "embed.weight"}


def test_lstm_biases_are_not_decayed():
    decay, no_decay = _group_names(nn.LSTM(4, 4))
    assert decay == {"weight_ih_l0", "weight_hh_l0"} and no_decay == {"bias_ih_l0", "bias_hh_l0"}


def _hf(name: str) -> nn.Module:
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    if name == "llama":
        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=8, tie_word_embeddings=False,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=8,
    )  # fmt: skip
    return BertForMaskedLM(config)


# What each architecture's names say a bias, norm or embedding is (an oracle independent of module types).
_EXEMPT_BY_NAME = {
    "gpt2": lambda n: n.endswith(".bias") or ".ln_" in n or n in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"),
    "llama": lambda n: "layernorm" in n or n in ("model.norm.weight", "model.embed_tokens.weight"),
    "bert": lambda n: n.endswith("bias") or "LayerNorm" in n or ".embeddings." in n or n == "cls.predictions.decoder.weight",
}  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_no_decay_group_holds_exactly_biases_norms_and_embeddings(arch):
    model = _hf(arch)
    decay, no_decay = _group_names(model)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert no_decay == {n for n in names if _EXEMPT_BY_NAME[arch](n)}
    assert decay == names - no_decay and decay  # every weight matrix decays, and there are some
    if arch == "llama":
        assert "lm_head.weight" in decay  # an untied output layer is a weight, not an embedding


def test_every_module_builds_its_optimizer_with_the_no_decay_rule(tiny_gpt2_config):
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    for module in (
        SFTModule(tiny_gpt2_config, weight_decay=0.1),
        DistillationModule(tiny_gpt2_config, tiny_gpt2_config, weight_decay=0.1),
    ):
        module.configure_model()
        module.trainer = trainer
        optimizer = module.configure_optimizers()["optimizer"]
        expected = decay_groups(module.trainable_modules(), 0.1)
        got = [(g["weight_decay"], [id(p) for p in g["params"]]) for g in optimizer.param_groups]
        assert got == [(g["weight_decay"], [id(p) for p in g["params"]]) for g in expected]
    seqgan = SeqGANModule(LSTMGenerator(50, 8, 8, 6), CNNDiscriminator(50, 8, (1, 2), (4, 4)))
    seqgan.configure_model()
    for optimizer in seqgan.configure_optimizers():  # no decoupled decay at all (D's L2 is in its loss)
        assert all(group["weight_decay"] == 0 for group in optimizer.param_groups)


# ---------------------------------------------------------------------------------------------- L1L2
class _Regression(L.LightningModule):
    """Least squares ``mean((X w - y)²)`` with SGD on a bias-free linear layer."""

    def __init__(self, dim: int, lr: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1, bias=False)
        self.lr = lr

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return F.mse_loss(self.linear(x).squeeze(-1), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n: int, w_true: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, len(w_true), generator=generator)
    return x, x @ w_true + noise * torch.randn(n, generator=generator)


def _fit(module: L.LightningModule, x: torch.Tensor, y: torch.Tensor, callbacks: list, **kwargs) -> L.Trainer:
    batch_size = kwargs.pop("batch_size", 32)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **kwargs,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=batch_size))
    return trainer


def test_l2_converges_to_the_ridge_solution_once_per_step_under_accumulation():
    torch.manual_seed(0)
    x, y = _data(64, torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]), noise=0.3)
    lam = 0.5
    # minimiser of mean((Xw - y)²) + λ‖w‖²: (XᵀX/N + λI) w = Xᵀy/N
    xd, yd = x.double(), y.double()
    ridge = torch.linalg.solve(xd.T @ xd / 64 + lam * torch.eye(5, dtype=torch.float64), xd.T @ yd / 64)
    module = _Regression(5, lr=0.2)
    # two micro-batches of 32 per optimizer step: the penalty must come in once per step, not per micro-batch
    trainer = _fit(module, x, y, [L1L2(l2=lam)], max_steps=60, accumulate_grad_batches=2)
    w = module.linear.weight.detach().double().squeeze(0)
    assert (w - ridge).abs().max() < 1e-3
    assert float(trainer.callback_metrics["regularization/penalty"]) == pytest.approx(
        lam * float(w.square().sum()), rel=1e-3
    )


def _lasso(x: torch.Tensor, y: torch.Tensor, lam: float, steps: int = 3000) -> torch.Tensor:
    """argmin mean((Xw - y)²) + λ‖w‖₁ by proximal gradient (ISTA, soft thresholding), in float64."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(steps):
        w = w - 0.05 * 2 / len(y) * x.T @ (x @ w - y)
        w = w.sign() * (w.abs() - 0.05 * lam).clamp(min=0)
    return w


def test_l1_drives_irrelevant_weights_to_zero_and_keeps_relevant_ones():
    torch.manual_seed(0)
    w_true = torch.tensor([2.0, -1.5, 0.0, 0.0, 0.0, 0.0])
    x, y = _data(64, w_true, noise=0.5)
    least_squares = torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.squeeze(-1)
    assert least_squares[2:].abs().max() > 0.2  # without the penalty the noise gives them weight
    lasso = _lasso(x, y, lam=0.4)
    assert (lasso[2:] == 0).all() and (lasso[:2].abs() > 1).all()
    module = _Regression(6, lr=0.02)
    _fit(module, x, y, [L1L2(l1=0.4)], max_steps=300, batch_size=64)
    w = module.linear.weight.detach().double().squeeze(0)
    assert w[2:].abs().max() < 2 * 0.02 * 0.4  # sign(w) steps of lr·λ1 keep them within 2·lr·λ1 of zero
    assert (w[:2] - lasso[:2]).abs().max() < 0.02  # the relevant ones stay, shrunk as the lasso shrinks them


class _ZeroLoss(L.LightningModule):
    """A loss whose gradient is zero (its value is not): the optimizer step sees only the penalty's gradient."""

    def __init__(self, optimizer: str = "sgd", scale_grads: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.optimizer, self.scale_grads = optimizer, scale_grads

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.linear(batch[0]).float().sum() * 0.0 + 1.0

    def on_before_optimizer_step(self, optimizer):  # type: ignore[no-untyped-def]
        for p in self.parameters():  # a module that post-processes its gradients (SFTModule weights by tokens)
            if p.grad is not None:
                p.grad.mul_(self.scale_grads)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.5)
        return torch.optim.Adam(self.parameters(), lr=0.1, eps=1.0, fused=self.optimizer == "fused_adam")


def _one_step(module: L.LightningModule, callback: L1L2, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight before and after one optimizer step."""
    before = module.linear.weight.detach().clone()
    x = torch.randn(8, 4)
    _fit(module, x, torch.zeros(8), [callback], max_steps=1, batch_size=8, **kwargs)
    return before, module.linear.weight.detach()


def test_the_penalty_gradient_is_added_after_the_module_processes_its_gradients():
    torch.manual_seed(0)
    before, after = _one_step(_ZeroLoss(scale_grads=3.0), L1L2(l1=0.1, l2=0.25))
    expected = before - 0.5 * (0.1 * before.sign() + 2 * 0.25 * before)
    torch.testing.assert_close(after, expected)


@pytest.mark.parametrize("optimizer", ["adam", "fused_adam"])
def test_fp16_loss_scaling_does_not_scale_the_penalty(optimizer):
    """Adam's first step with eps=1 moves by lr·g/(|g|+1): a gradient off by the loss scale (1024) would show."""
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    module = _ZeroLoss(optimizer)
    before, after = _one_step(module, L1L2(l2=0.3), plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    reference = before.clone().requires_grad_(True)
    reference.grad = 2 * 0.3 * before
    torch.optim.Adam([reference], lr=0.1, eps=1.0).step()
    torch.testing.assert_close(after, reference.detach())


class _TwoOptimizers(L.LightningModule):
    """Manual optimization with one optimizer per layer, as SeqGAN."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        for optimizer, layer in zip(self.optimizers(), (self.a, self.b)):  # type: ignore[arg-type]
            optimizer.zero_grad()
            self.manual_backward(layer(batch[0]).sum() * 0.0)
            optimizer.step()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return [torch.optim.SGD(self.a.parameters(), lr=0.5), torch.optim.SGD(self.b.parameters(), lr=0.5)]


def test_manual_optimization_penalises_only_the_chosen_parameters_once_per_step():
    torch.manual_seed(0)
    module = _TwoOptimizers()
    a0, b0 = module.a.weight.detach().clone(), module.b.weight.detach().clone()
    callback = L1L2(l2=0.25, include=r"^b\.")
    _fit(module, torch.randn(8, 4), torch.zeros(8), [callback], max_steps=1, batch_size=8)
    assert callback.targets == ["b.weight"]  # the bias is a no-decay parameter
    torch.testing.assert_close(module.a.weight.detach(), a0)
    torch.testing.assert_close(module.b.weight.detach(), b0 * (1 - 0.5 * 2 * 0.25))


def test_selection_follows_include_exclude_and_the_no_decay_rule(tiny_gpt2_config):
    model = GPT2LMHeadModel(tiny_gpt2_config)
    names = [n for n, _ in L1L2(l1=1.0).select(model)]
    assert names and all(n.endswith("weight") and ".ln_" not in n and "wte" not in n and "wpe" not in n for n in names)
    names = [n for n, _ in L1L2(l1=1.0, include=r"\.mlp\.", exclude=r"c_proj").select(model)]
    assert names == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"]
    everything = [n for n, _ in L1L2(l1=1.0, exclude_no_decay=False).select(model)]
    assert len(everything) == len(list(model.parameters()))


def test_bad_arguments_are_named_in_one_message():
    with pytest.raises(ConfigurationError) as error:
        L1L2(l1=-0.1, l2=float("nan"), include="(", exclude_no_decay="yes")  # type: ignore[arg-type]
    message = str(error.value)
    for fragment in ("`l1` must be >= 0.0, got -0.1", "`l2` must be a finite number, got nan", "`include`", "'('",
                     "`exclude_no_decay` must be True or False, got 'yes'"):  # fmt: skip
        assert fragment in message


def test_a_pattern_that_matches_nothing_is_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with pytest.raises(
        ConfigurationError, match=r"`include` pattern 'attn' matches no parameter name.*`exclude` pattern 'mlp'"
    ):
        L1L2(l2=1.0, include="attn", exclude="mlp").select(model)
    with pytest.raises(ConfigurationError, match="selects no trainable parameter"):
        L1L2(l2=1.0, include=r"^1\.").select(model)  # only the norm matches: a no-decay parameter


def test_a_pattern_that_matches_nothing_stops_the_fit():
    module = _Regression(2, lr=0.1)
    with pytest.raises(ConfigurationError, match="'encoder'"):
        _fit(module, torch.randn(4, 2), torch.zeros(4), [L1L2(l1=0.1, include="encoder")], max_steps=1)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_is_refused_at_setup(stage):
    pytest.importorskip("deepspeed")
    from lit_bigmodel.strategies import deepspeed_strategy

    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=deepspeed_strategy(stage, accelerator="cpu"), logger=False
    )
    with pytest.raises(ConfigurationError, match=f"DeepSpeed ZeRO stage {stage}"):
        L1L2(l2=0.1).setup(trainer, _Regression(2, 0.1), "fit")


def test_fsdp1_is_refused_at_setup():
    from lit_bigmodel.strategies import fsdp_strategy

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=fsdp_strategy(accelerator="cpu"), logger=False)
    with pytest.raises(ConfigurationError, match=r"FSDPStrategy.*use fsdp2_strategy"):
        L1L2(l2=0.1).setup(trainer, _Regression(2, 0.1), "fit")


def test_l2_with_weight_decay_on_the_same_parameters_warns(tiny_gpt2_config):
    class WithDecay(_Regression):
        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.01)

    with pytest.warns(UserWarning, match="both shrink the same parameters"):
        _fit(WithDecay(2, 0.1), torch.randn(4, 2), torch.zeros(4), [L1L2(l2=0.1)], max_steps=1)


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.multiprocess
def test_fsdp2_penalty_equals_the_single_process_value(tmp_path):
    """The script trains a GPT-2 under FSDP2 on 2 processes, then compares with one process (the gathered weights)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "scripts" / "regularization_fsdp2.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and report["sharded"] > 0  # the weights really were DTensor shards
    assert report["penalty_sharded"] > 0 and report["penalty_local"] < 0.9 * report["penalty_single"]
    assert report["penalty_sharded"] == pytest.approx(report["penalty_single"], abs=1e-6, rel=0)
    assert report["logged"] == pytest.approx(report["penalty_single_before_last_step"], rel=1e-5)
    assert report["max_abs_grad_error"] < 1e-6  # the local shard's penalty gradient, gathered, equals the whole one
