"""SFTModule's fast path: chunked loss, fallbacks, padding-free batches, checkpointing, compile, no host syncs."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from lit_bigmodel import ConfigurationError, DistillationModule, SFTModule
from lit_bigmodel.datamodules import ArithmeticDataModule, InstructionDataModule
from lit_bigmodel.datamodules.padding_free import flatten_batch
from lit_bigmodel.losses import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss
from lit_bigmodel.objectives import CausalLMObjective
from tests.conftest import addition_rows, tiny_trainer, write_jsonl

VOCAB = 97


def _gpt2(**kwargs):
    defaults = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": VOCAB}
    defaults.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    defaults.update(kwargs)
    return GPT2Config(**defaults)


def _llama(**kwargs):
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    for key, value in kwargs.items():
        setattr(config, key, value)
    return config


def _twins(config, **fast_kwargs):
    """A fast-path and a plain-path module over identical networks."""
    torch.manual_seed(0)
    fast = SFTModule(config, **fast_kwargs)
    fast.configure_model()
    plain = SFTModule(config, chunked_loss=False, compile=False)
    plain.configure_model()
    plain.model.load_state_dict(fast.model.state_dict())
    return fast, plain


def _random_batch(batch=3, length=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX  # a prompt
    labels[1, 15:] = IGNORE_INDEX  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _count_chunked_calls(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return chunked_causal_lm_loss(*args, **kwargs)

    monkeypatch.setattr("lit_bigmodel.objectives.chunked_causal_lm_loss", counting)
    return calls


# ----------------------------------------------------------------------------- the loss itself
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_loss_equals_float64_reference_in_value_and_gradients(chunk_size):
    torch.manual_seed(0)
    hidden64 = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    weight64 = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 6:] = IGNORE_INDEX
    reference, reference_count = causal_lm_loss(hidden64 @ weight64.T, labels)
    grad_hidden, grad_weight = torch.autograd.grad(3.0 * reference, (hidden64, weight64))

    hidden = hidden64.detach().float().requires_grad_()
    weight = weight64.detach().float().requires_grad_()
    loss, count = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size)
    (3.0 * loss).backward()  # the incoming gradient scales the precomputed ones
    assert int(count) == int(reference_count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(hidden.grad.double(), grad_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), grad_weight, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the no-gradient branch gives the same value
        assert float(chunked_causal_lm_loss(hidden, weight, labels, chunk_size)[0]) == pytest.approx(loss.item())


def test_chunked_loss_with_no_labelled_token_is_zero_with_zero_gradients():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss, count = chunked_causal_lm_loss(hidden, weight, torch.full((2, 5), IGNORE_INDEX))
    loss.backward()
    assert int(count) == 0 and loss.item() == 0.0
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_chunked_loss_under_bf16_autocast_matches_the_full_logits_loss():
    torch.manual_seed(0)
    hidden = torch.randn(4, 33, 32, requires_grad=True)
    head = torch.nn.Linear(32, 300, bias=False)
    labels = torch.randint(0, 300, (4, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = causal_lm_loss(head(hidden), labels)[0]
        chunked = chunked_causal_lm_loss(hidden, head.weight, labels, chunk_size=50)[0]
    full_grads = torch.autograd.grad(full, (hidden, head.weight))
    chunked_grads = torch.autograd.grad(chunked, (hidden, head.weight))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-3)
    for ours, theirs in zip(chunked_grads, full_grads):
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


def test_chunked_loss_rejects_a_non_positive_chunk_size():
    with pytest.raises(ValueError, match="`chunk_size`"):
        chunked_causal_lm_loss(torch.randn(1, 3, 4), torch.randn(5, 4), torch.zeros(1, 3, dtype=torch.long), 0)


# ----------------------------------------------------------------------------- the module's fast path
@pytest.mark.parametrize("make_config", [_gpt2, _llama], ids=["gpt2-tied-head", "llama-own-head"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_fast_path_gives_the_plain_path_loss_and_gradients(make_config, bf16, monkeypatch):
    calls = _count_chunked_calls(monkeypatch)
    fast, plain = _twins(make_config(), loss_chunk_size=16)
    batch = _random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        fast_loss, plain_loss = fast.compute_loss(batch), plain.compute_loss(batch)
    fast_loss.backward()
    plain_loss.backward()
    assert calls, "the fast path did not use the chunked loss"
    tolerance = 1e-2 if bf16 else 1e-5
    assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=tolerance)
    for (name, ours), theirs in zip(fast.model.named_parameters(), plain.model.parameters()):
        scale = theirs.grad.abs().max().item()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=tolerance, atol=tolerance * scale, msg=name)


@pytest.fixture
def one_thread():
    """Tiny models run as fast on one thread, and do not slow down tenfold when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_curves_of_plain_and_fast_path_match_over_200_steps(tmp_path, one_thread):
    config = _gpt2(n_positions=16, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # dropout: same draws

    def train(**kwargs):
        losses = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                losses.append(outputs["loss"].detach())

        L.seed_everything(0)
        dm = ArithmeticDataModule(max_operand=20, num_val=20, num_test=20, batch_size=32, eval_batch_size=20)
        module = SFTModule(config, learning_rate=3e-3, warmup_steps=10, compile=False, **kwargs)
        trainer = tiny_trainer(tmp_path, max_steps=200, limit_val_batches=0, callbacks=[Record()])
        trainer.fit(module, dm)
        return torch.stack(losses)

    plain, fast = train(chunked_loss=False), train(chunked_loss=True)
    assert len(plain) == len(fast) == 200
    assert fast[-20:].mean() < 0.5 * fast[:5].mean()  # it learns
    assert (plain - fast).abs().max() < 1e-4  # measured 7e-7; a wrong gradient, dropout draw or mask would diverge


def test_chunked_loss_steps_aside_when_from_logits_is_overridden(monkeypatch, caplog):
    calls = _count_chunked_calls(monkeypatch)

    class Doubled(CausalLMObjective):
        def from_logits(self, logits, batch):
            terms = super().from_logits(logits, batch)
            return terms._replace(total=2 * terms.total)

    torch.manual_seed(0)
    module = SFTModule(_gpt2(), compile=False, objective=Doubled())
    module.configure_model()
    batch = _random_batch()
    with caplog.at_level("INFO"):
        loss = module.compute_loss(batch)
    assert not calls
    assert "overrides `from_logits`" in caplog.text
    expected = 2 * causal_lm_loss(module.model(**module.model_inputs(batch)).logits, batch["labels"])[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


class _ScaledLogitsGPT2(GPT2LMHeadModel):
    """A causal LM whose logits are not ``head(body(x))``: the structure looks right, the numbers do not."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_chunked_loss_falls_back_for_networks_that_transform_the_logits(monkeypatch, caplog):
    calls = _count_chunked_calls(monkeypatch)
    torch.manual_seed(0)
    module = SFTModule(lambda: _ScaledLogitsGPT2(_gpt2()), compile=False)
    module.configure_model()
    batch = _random_batch()
    with caplog.at_level("INFO"):
        loss = module.compute_loss(batch)
    assert not calls
    assert "not head(base_model(...))" in caplog.text
    expected = causal_lm_loss(module.model(**module.model_inputs(batch)).logits, batch["labels"])[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    softcapped = SFTModule(_gpt2(final_logit_softcapping=30.0), compile=False)
    softcapped.configure_model()
    with caplog.at_level("INFO"):
        softcapped.compute_loss(batch)
    assert not calls and "final_logit_softcapping" in caplog.text


def test_chunked_loss_falls_back_for_a_network_without_a_hugging_face_head(monkeypatch, caplog):
    calls = _count_chunked_calls(monkeypatch)

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.table(input_ids)})()

    module = SFTModule(Bigram, compile=False)
    module.configure_model()
    with caplog.at_level("INFO"):
        loss = module.compute_loss(_random_batch())
    assert not calls and torch.isfinite(loss)
    assert "no bias-free nn.Linear LM head" in caplog.text


def test_gradient_checkpointing_gives_the_same_gradients():
    fast, plain = _twins(_llama(), gradient_checkpointing=True, compile=False)

    def checkpointing(module):
        return any(getattr(m, "gradient_checkpointing", False) is True for m in module.model.modules())

    assert checkpointing(fast) and not checkpointing(plain)
    batch = _random_batch()
    fast.compute_loss(batch).backward()
    plain.compute_loss(batch).backward()
    for (name, ours), theirs in zip(fast.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_needs_a_hugging_face_network():
    module = SFTModule(lambda: torch.nn.Linear(2, 2), gradient_checkpointing=True)
    with pytest.raises(ConfigurationError, match="gradient_checkpointing_enable"):
        module.configure_model()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_distillation_keeps_using_the_full_logits(monkeypatch, char_tokenizer, tiny_gpt2_config, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("DistillationModule must not use the chunked loss")

    monkeypatch.setattr("lit_bigmodel.objectives.chunked_causal_lm_loss", fail)
    dm = InstructionDataModule(char_tokenizer, train_file=str(write_jsonl(tmp_path / "t.jsonl", addition_rows(8))))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = DistillationModule(tiny_gpt2_config, tiny_gpt2_config, tokenizer=char_tokenizer, alpha=0.5)
    module.configure_model()
    assert torch.isfinite(module.training_step(batch, 0))


# ----------------------------------------------------------------------------- padding-free batches
def test_flatten_batch_layout():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 6, 7, -100], [8, 9, -100, -100]]),
    }
    flat = flatten_batch(batch)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert flat["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 7 is never trained to predict 8
    assert flat["cu_seq_lens"].tolist() == [0, 3, 5] and flat["cu_seq_lens"].dtype == torch.int32
    assert flat["max_length"] == 3
    with pytest.raises(ConfigurationError, match="at most 2"):
        flatten_batch(batch, max_length=2)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_padding_free_loss_equals_the_padded_loss(attention, packing, char_tokenizer, tmp_path):
    rows = write_jsonl(tmp_path / "t.jsonl", addition_rows(24))
    dm = InstructionDataModule(char_tokenizer, train_file=str(rows), max_length=40, packing=packing, batch_size=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert ("document_ids" in batch) == packing
    config = _gpt2(vocab_size=len(char_tokenizer))
    config._attn_implementation = attention
    fast, plain = _twins(config, compile=False)
    flat = flatten_batch(batch, max_length=64)
    real_tokens = (batch["document_ids"] >= 0) if packing else batch["attention_mask"].bool()
    assert flat["input_ids"].shape == (1, int(real_tokens.sum()))
    padded_loss = plain.compute_loss(batch)
    flat_loss = fast.compute_loss(flat)
    plain_flat_loss = plain.compute_loss(flat)
    assert flat_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert plain_flat_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:You have overridden `on_before_batch_transfer`")  # expected: our hook is used
def test_padding_free_training_flattens_batches_on_the_host(char_tokenizer, tmp_path):
    seen = []

    class Spy(SFTModule):
        def training_batch(self, batch):
            seen.append(tuple(batch["input_ids"].shape))
            return super().training_batch(batch)

    dm = InstructionDataModule(
        char_tokenizer, train_file=str(write_jsonl(tmp_path / "t.jsonl", addition_rows(16))), batch_size=4
    )
    module = Spy(_gpt2(vocab_size=len(char_tokenizer)), padding_free=True, compile=False)
    with pytest.warns(UserWarning, match="padding_free=True"):
        tiny_trainer(tmp_path, max_steps=2, limit_val_batches=1).fit(module, dm)
    assert len(seen) == 2 and all(shape[0] == 1 for shape in seen)


# ----------------------------------------------------------------------------- logging, arguments, pickling
def test_progress_bar_loss_is_refreshed_every_n_steps_only(tmp_path, char_tokenizer):
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append((trainer.progress_bar_metrics.get("loss"), outputs["loss"].item()))

    dm = InstructionDataModule(
        char_tokenizer, train_file=str(write_jsonl(tmp_path / "t.jsonl", addition_rows(40))), batch_size=4
    )
    module = SFTModule(_gpt2(vocab_size=len(char_tokenizer)), learning_rate=1e-2, compile=False)
    trainer = tiny_trainer(tmp_path, max_steps=8, limit_val_batches=0, log_every_n_steps=4, callbacks=[Watch()])
    trainer.fit(module, dm)
    shown = [value for value, _ in seen]
    assert shown[0] == pytest.approx(seen[0][1]) and shown[4] == pytest.approx(seen[4][1])
    assert shown[1:4] == [shown[0]] * 3 and shown[5:8] == [shown[4]] * 3  # stale in between: no per-step .item()
    assert "train/loss" not in trainer.progress_bar_metrics and "train/loss" in trainer.callback_metrics


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"compile": "fastest"}, "compile"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
        ({"padding_free": True, "task": "sequence_classification"}, "padding_free"),
    ],
)
def test_invalid_fast_path_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ConfigurationError, match=f"`{name}"):
        SFTModule(_gpt2(), **kwargs)


@pytest.mark.filterwarnings("ignore:`padding_free=True` with attn_implementation")
def test_module_with_a_built_training_step_still_pickles():
    import pickle

    module = SFTModule(_gpt2(), compile=False, padding_free=True)
    module.configure_model()
    module.compute_loss(_random_batch())
    clone = pickle.loads(pickle.dumps(module))
    assert clone._step is None
    assert clone.compute_loss(_random_batch()).item() == pytest.approx(module.compute_loss(_random_batch()).item())


# ----------------------------------------------------------------------------- compile (slow on CPU) and GPU
@pytest.mark.slow
def test_compiled_fast_path_matches_eager():
    fast, plain = _twins(_gpt2(), compile=True)
    for seed in range(2):
        batch = _random_batch(seed=seed)
        compiled, eager = fast.compute_loss(batch), plain.compute_loss(batch)
        compiled.backward()
        eager.backward()
        assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for ours, theirs in zip(fast.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_fast_path_step_makes_no_host_sync_in_our_code():
    fast, _ = _twins(_gpt2(n_layer=2, n_embd=64, n_head=2), compile=False)
    fast.to("cuda")
    optimizer = torch.optim.AdamW(fast.model.parameters(), fused=True)
    batch = {k: v.cuda() for k, v in _random_batch().items() if k != "attention_mask"}
    fast.compute_loss(batch).backward()  # first call: builds the step (checks the head once, which syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = fast.compute_loss(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in caught if "lit_bigmodel" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
