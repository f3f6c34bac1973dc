"""The pieces SFTModule's evaluation and optimizer are made of: exact match, metrics by stage, decay groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.evaluation import EvaluationMetrics, exact_match
from lit_bigmodel.objectives import LossTerms
from lit_bigmodel.optim import decay_groups

EOS = 2


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ([5, 6, EOS], True),  # the answer, then EOS
        ([5, 6, EOS, 9, 9], True),  # anything after EOS is not read
        ([5, 6], True),  # generate returned fewer tokens (it stops once every row has ended): the rest is EOS
        ([5, 6, 7], False),  # kept going
        ([5, EOS, 6], False),  # stopped early
        ([5], False),
        ([], False),  # nothing generated
    ],
)
def test_exact_match_is_the_answer_then_eos(generated, expected):
    new_tokens = torch.tensor([generated], dtype=torch.long).reshape(1, len(generated))
    assert exact_match(new_tokens, torch.tensor([[5, 6]]), EOS).tolist() == [expected]


def test_exact_match_ignores_the_padding_of_shorter_completions():
    completions = torch.tensor([[5, 6, 7], [5, -100, -100]])
    generated = torch.tensor([[5, 6, 7, EOS], [5, EOS, 0, 0]])
    assert exact_match(generated, completions, EOS).tolist() == [True, True]
    assert exact_match(torch.tensor([[5, 6, 7, 8], [5, 6, EOS, 0]]), completions, EOS).tolist() == [False, False]


def test_metrics_are_kept_apart_by_stage_weighted_by_units_and_reset_by_compute():
    metrics = EvaluationMetrics("causal_lm")
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = 1.0  # predicts token 1 after position 0
    batch = {"labels": torch.tensor([[-100, 1, 3]])}
    metrics.update("val", logits, batch, LossTerms(torch.tensor(4.0), torch.tensor(2), {}))
    metrics.update("val", logits, batch, LossTerms(torch.tensor(1.0), torch.tensor(1), {}))
    metrics.update("test", logits, batch, LossTerms(torch.tensor(9.0), torch.tensor(1), {}))
    val = metrics.compute("val")
    assert val["val/loss"].item() == pytest.approx(5.0 / 3)  # (2 × 2.0 + 1 × 1.0) / 3 units, not (2 + 1) / 2
    assert val["val/perplexity"].item() == pytest.approx(torch.exp(torch.tensor(5.0 / 3)).item())
    assert val["val/token_accuracy"].item() == pytest.approx(0.5)
    assert "val/exact_match" not in val  # never updated: not reported
    assert metrics.compute("test")["test/loss"].item() == pytest.approx(9.0)
    assert metrics.compute("val") == {}  # reset


def test_classification_metrics_need_the_number_of_labels():
    with pytest.raises(ConfigurationError, match="num_labels"):
        EvaluationMetrics("sequence_classification")


def test_classification_accuracy_is_the_fraction_correct_and_f1_is_macro():
    metrics = EvaluationMetrics("sequence_classification", num_labels=2)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])  # imbalanced: 8 of class 0, 2 of class 1
    predicted = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 0])  # 9 of 10 right; class 1's recall is 1/2
    logits = nn.functional.one_hot(predicted, 2).float()
    metrics.update("test", logits, {"labels": labels}, LossTerms(torch.tensor(0.1), torch.tensor(10), {}))
    values = metrics.compute("test")
    assert values["test/accuracy"].item() == pytest.approx(0.9)  # not the mean per-class recall, 0.75
    assert values["test/f1"].item() == pytest.approx((16 / 17 + 2 / 3) / 2)  # F1 per class: 16/17 and 2/3


def test_decay_groups_skip_biases_norms_embeddings_and_list_tied_weights_once():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    decay, no_decay = decay_groups([model], weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    assert {names[i] for i in decayed} == {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_proj.weight",
    }
    everything = decay["params"] + no_decay["params"]
    assert len(everything) == len({id(p) for p in everything})  # lm_head.weight is wte.weight: once
    assert model.lm_head.weight is model.transformer.wte.weight and id(model.lm_head.weight) not in decayed
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in everything} == trainable
    assert decay_groups([nn.LayerNorm(4)], 0.1)[0]["weight_decay"] == 0.0  # no empty group
