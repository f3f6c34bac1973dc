"""Training objectives: token-weighted gradient accumulation (SFT, distillation, DDP), custom objectives, checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config

from lit_bigmodel import ConfigurationError, DistillationModule, SFTModule
from lit_bigmodel.datamodules.padding_free import flatten_batch
from lit_bigmodel.losses import IGNORE_INDEX, causal_lm_loss
from lit_bigmodel.objectives import CausalLMObjective, ClassificationObjective, LossTerms, UnitWeighting
from tests.conftest import tiny_trainer

VOCAB = 50
LENGTH = 20


def _gpt2(n_layer=2, n_head=2):
    return GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=n_head, n_positions=32, vocab_size=VOCAB,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


def _micro_batches(count=4, rows=2, seed=0):
    """``count`` batches of ``rows`` rows whose completions differ a lot in length (1 to 16 labelled tokens)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        input_ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        completion = 1 if i % 2 == 0 else 16  # short and long completions alternate
        labels[:, LENGTH - completion :] = input_ids[:, LENGTH - completion :]
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return batches


def _merge(batches):
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


class _SGD:
    """Plain SGD, so that the update is proportional to the gradient (Adam's first step is not)."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for m in self.trainable_modules() for p in m.parameters()], lr=0.5)


class SGDSFT(_SGD, SFTModule):
    pass


class SGDDistillation(_SGD, DistillationModule):
    pass


def _train(make_module, batches, accumulate, tmp_path):
    L.seed_everything(0)
    module = make_module()
    loader = DataLoader(batches, batch_size=None)
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0, accumulate_grad_batches=accumulate)
    trainer.fit(module, loader)
    assert trainer.global_step == 2
    return {name: p.detach().clone() for name, p in module.model.named_parameters()}


def _max_difference(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("kind", ["sft", "distill"])
def test_accumulated_micro_batches_equal_one_large_batch(kind, tmp_path):
    def make():
        if kind == "sft":
            return SGDSFT(_gpt2(), compile=False)
        return SGDDistillation(_gpt2(1), _gpt2(2), alpha=0.5, compile=False)

    micro = _micro_batches(8)
    merged = [_merge(micro[:4]), _merge(micro[4:])]
    accumulated = _train(make, micro, 4, tmp_path / "a")
    large = _train(make, merged, 1, tmp_path / "b")
    L.seed_everything(0)
    initial = make()
    initial.configure_model()
    moved = max((large[n] - p.detach()).abs().max().item() for n, p in initial.model.named_parameters())
    assert moved > 1e-3  # the optimizer steps really changed the weights
    assert _max_difference(accumulated, large) < 1e-5


def test_classification_accumulation_weights_examples(tmp_path, tiny_bert_config):
    def batches(sizes, seed=0):
        generator = torch.Generator().manual_seed(seed)
        out = []
        for size in sizes:
            ids = torch.randint(0, 64, (size, 8), generator=generator)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2})
        return out

    def make():
        return SGDSFT(tiny_bert_config, task="sequence_classification", num_labels=2, compile=False)

    micro = batches([1, 7, 1, 7])  # micro-batches of 1 and 7 examples
    accumulated = _train(make, micro, 2, tmp_path / "a")
    large = _train(make, [_merge(micro[:2]), _merge(micro[2:])], 1, tmp_path / "b")
    assert _max_difference(accumulated, large) < 1e-5


def test_logged_train_loss_is_the_batch_mean(tmp_path):
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            with torch.no_grad():  # the first micro-batch: no optimizer step yet, the weights it saw
                expected = causal_lm_loss(module(batch), batch["labels"])[0]
            seen.append((outputs["loss"].item(), trainer.callback_metrics["train/loss"].item(), expected.item()))

    module = SGDSFT(_gpt2(), compile=False)
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[Watch()])
    trainer.fit(module, DataLoader(_micro_batches(2), batch_size=None))
    returned, logged, expected = seen[0]
    assert logged == pytest.approx(expected, rel=1e-5)  # the batch's mean, not its token sum
    assert 2 * returned == pytest.approx(expected, rel=1e-5)  # Lightning reports the loss / accumulate_grad_batches


def test_custom_objective_is_used_for_training_and_validation(tmp_path):
    class Doubled(CausalLMObjective):
        def from_logits(self, logits, batch):
            mean, count = causal_lm_loss(logits, batch["labels"])
            return LossTerms(2 * mean * count, count, {})

    torch.manual_seed(0)
    module = SFTModule(_gpt2(), objective=Doubled(), compile=False, generate_eval=False)
    module.configure_model()
    batch = _micro_batches(1)[0]
    expected = 2 * causal_lm_loss(module(batch), batch["labels"])[0]
    assert module.compute_loss(batch).item() == pytest.approx(expected.item(), rel=1e-6)
    trainer = tiny_trainer(tmp_path)
    metrics = trainer.validate(module, DataLoader([batch], batch_size=None), verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_default_objective_follows_the_task(tiny_gpt2_config, tiny_bert_config):
    assert isinstance(SFTModule(tiny_gpt2_config).objective, CausalLMObjective)
    assert isinstance(SFTModule(tiny_bert_config, task="sequence_classification").objective, ClassificationObjective)
    assert SFTModule(tiny_gpt2_config, chunked_loss=False, loss_chunk_size=7).objective.chunk_size == 7


def test_deepspeed_falls_back_to_each_micro_batch_mean(caplog):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    pytest.importorskip("deepspeed")
    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=2))
    total = torch.tensor(6.0, requires_grad=True)
    terms = LossTerms(total, torch.tensor(3), {})
    weighting = UnitWeighting()
    with caplog.at_level("INFO"):
        loss = weighting.loss(terms, terms.mean, trainer)
    assert "Under DeepSpeed" in caplog.text and weighting.window_units is None
    loss.backward()
    assert loss.item() == 2.0 and total.grad.item() == pytest.approx(1 / 3)  # the plain mean's gradient


# ----------------------------------------------------------------------------- distillation specifics
def test_attention_head_mismatch_fails_in_configure_model():
    module = DistillationModule(_gpt2(2, n_head=2), _gpt2(2, n_head=4), attention_layer_map={1: 2}, compile=False)
    with pytest.raises(ConfigurationError, match=r"`attention_layer_map`.*2 heads.*4 heads"):
        module.configure_model()


def test_distillation_honours_the_fast_path_switches():
    module = DistillationModule(
        _gpt2(2), _gpt2(2), compile=False, chunked_loss=False, loss_chunk_size=8, gradient_checkpointing=True,
        padding_free=True,
    )  # fmt: skip
    assert module.hparams["loss_chunk_size"] == 8 and module.hparams["gradient_checkpointing"] is True
    module.configure_model()
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in module.model.modules())
    assert module.padding_free and module.compile_mode is False
    batch = _micro_batches(1, rows=3)[0]
    batch["attention_mask"][1, 12:] = 0  # a padded row
    batch["labels"][1, 12:] = IGNORE_INDEX
    module.eval()  # no dropout: both layouts compute the same function
    padded = module.compute_loss(batch)
    with pytest.warns(UserWarning, match="padding_free=True"):
        module._step = None  # rebuilt, with the attention-implementation warning
        flat = module.compute_loss(flatten_batch(batch))
    assert flat.item() == pytest.approx(padded.item(), rel=1e-5)  # student and teacher both see the flat row


@pytest.mark.parametrize(
    "switch",
    [{"compile": True}, {"gradient_checkpointing": True}, {"padding_free": True}, {"chunked_loss": True}],
    ids=lambda switch: next(iter(switch)),
)
def test_each_distillation_switch_gives_the_plain_paths_loss_and_gradients(switch):
    args = {"alpha": 0.5, "hidden_layer_map": {2: 2}, "compile": False, "chunked_loss": False}
    plain = DistillationModule(_gpt2(2), _gpt2(2), **args)
    switched = DistillationModule(_gpt2(2), _gpt2(2), **{**args, **switch})
    torch.manual_seed(0)
    plain.configure_model()
    switched.configure_model()
    switched.load_state_dict(plain.state_dict())  # same student, teacher and projections
    batch = _micro_batches(1, rows=3)[0]
    batch["attention_mask"][1, 12:] = 0  # a padded row
    batch["labels"][1, 12:] = IGNORE_INDEX
    for module in (plain, switched):
        module.model.train()  # no dropout in _gpt2: train mode computes the same function as eval
    expected = plain.compute_loss(batch)
    expected.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # padding_free under sdpa warns that flash attention is faster
        loss = switched.compute_loss(flatten_batch(batch) if "padding_free" in switch else batch)
    loss.backward()
    honoured = {
        "compile": hasattr(switched._step, "_torchdynamo_orig_callable"),  # the objective's step is compiled
        "gradient_checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in switched.model.modules()),
        "padding_free": switched.padding_free,
        "chunked_loss": True,  # no effect in distillation (documented): the KD term needs the full logits
    }
    assert honoured[next(iter(switch))]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, ours), theirs in zip(switched.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: SFTModule(_gpt2(), learning_rate=math.inf), "learning_rate"),
        (lambda: SFTModule(_gpt2(), warmup_steps=math.nan), "warmup_steps"),
        (lambda: SFTModule(_gpt2(), weight_decay=math.inf), "weight_decay"),
        (lambda: SFTModule(_gpt2(), min_lr_ratio=math.nan), "min_lr_ratio"),
        (lambda: DistillationModule(_gpt2(), _gpt2(), alpha=math.nan), "alpha"),
        (lambda: DistillationModule(_gpt2(), _gpt2(), temperature=math.inf), "temperature"),
        (lambda: DistillationModule(_gpt2(), _gpt2(), hidden_weight=math.inf), "hidden_weight"),
        (lambda: DistillationModule(_gpt2(), _gpt2(), learning_rate=math.inf), "learning_rate"),
    ],
)
def test_non_finite_numbers_are_rejected(make, name):
    with pytest.raises(ConfigurationError, match=f"`{name}`"):
        make()


def test_sft_and_distillation_problems_are_reported_at_once():
    with pytest.raises(ConfigurationError, match=r"`alpha`.*|`learning_rate`.*") as caught:
        DistillationModule(_gpt2(), _gpt2(), alpha=2.0, learning_rate=-1.0)
    assert "`alpha`" in str(caught.value) and "`learning_rate`" in str(caught.value)


# ----------------------------------------------------------------------------- DDP: tokens counted across ranks
def _ddp_main(out: str) -> None:
    """Two ranks, two micro-batches each per optimizer step; rank 0 writes the student's weights."""

    class RankData(L.LightningDataModule):
        def train_dataloader(self):  # rank r trains on the micro-batches r, r + 2, ...
            return DataLoader(_micro_batches(8)[self.trainer.global_rank :: 2], batch_size=None)

    L.seed_everything(0)
    module = SGDSFT(_gpt2(), compile=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, accumulate_grad_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, RankData())
    if trainer.global_rank == 0:
        torch.save({n: p.detach() for n, p in module.model.named_parameters()}, os.path.join(out, "ddp.pt"))
    torch.distributed.barrier()


@pytest.mark.multiprocess
def test_ddp_counts_tokens_across_ranks(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600, cwd=root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    micro = _micro_batches(8)
    # step one sees micro-batches 0..3 (0, 2 on rank 0; 1, 3 on rank 1), step two 4..7
    large = _train(lambda: SGDSFT(_gpt2(), compile=False), [_merge(micro[:4]), _merge(micro[4:])], 1, tmp_path)
    assert _max_difference(ddp, large) < 1e-5, json.dumps({n: (ddp[n] - large[n]).abs().max().item() for n in ddp})


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
