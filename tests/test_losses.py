import math

import pytest
import torch

from lit_bigmodel.losses import IGNORE_INDEX, attention_loss, causal_lm_loss, distillation_loss, hidden_state_loss


def test_causal_lm_loss_equals_float64_reference_with_mask():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    loss, count = causal_lm_loss(logits, labels)

    total, n = 0.0, 0
    for b in range(3):
        for t in range(6):  # position t predicts label t + 1
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[target])
            n += 1
    assert int(count) == n
    assert math.isclose(float(loss), total / n, rel_tol=1e-6)


def test_causal_lm_loss_with_no_labelled_token_is_zero_not_nan():
    loss, count = causal_lm_loss(torch.randn(1, 4, 5), torch.full((1, 4), IGNORE_INDEX))
    assert int(count) == 0 and float(loss) == 0.0


# ----------------------------------------------------------------------------- distillation losses


def _softmax64(z, temperature):
    return torch.softmax(z.double() / temperature, dim=-1)


def _kl64(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def _reference(student, teacher, kind, temperature, beta, mask):
    p_s, p_t = _softmax64(student, temperature), _softmax64(teacher, temperature)
    if kind == "forward_kl":
        per = _kl64(p_t, p_s)
    elif kind == "reverse_kl":
        per = _kl64(p_s, p_t)
    elif kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        per = beta * _kl64(p_t, m) + (1 - beta) * _kl64(p_s, m)
    else:
        per = ((student.double() - teacher.double()) / temperature).pow(2).mean(-1)
    return temperature**2 * float(per[mask].mean())


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "mse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_losses_equal_float64_reference(kind, temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 6, 13), torch.randn(3, 6, 13) * 2
    mask = torch.rand(3, 6) > 0.3
    got = distillation_loss(student, teacher, kind, temperature=temperature, beta=0.3, mask=mask)
    assert float(got) == pytest.approx(_reference(student, teacher, kind, temperature, 0.3, mask), rel=1e-5)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    torch.manual_seed(2)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    assert torch.allclose(distillation_loss(s, t, "jsd", beta=0.0), distillation_loss(s, t, "forward_kl"))
    assert torch.allclose(distillation_loss(s, t, "jsd", beta=1.0), distillation_loss(s, t, "reverse_kl"))
    # and the interior is continuous towards them at T=1
    assert float(distillation_loss(s, t, "jsd", beta=0.5)) > 0


def test_top_k_renormalises_both_distributions_over_the_teacher_support():
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 20), torch.randn(2, 5, 20)
    k = 4
    values, indices = t.topk(k, dim=-1)
    ref = _reference(s.gather(-1, indices), values, "forward_kl", 2.0, 0.5, torch.ones(2, 5, dtype=torch.bool))
    assert float(distillation_loss(s, t, "forward_kl", temperature=2.0, top_k=k)) == pytest.approx(ref, rel=1e-5)
    cached = distillation_loss(s, values, "forward_kl", temperature=2.0, teacher_indices=indices)
    assert float(cached) == pytest.approx(ref, rel=1e-5)


def test_hidden_and_attention_losses_equal_reference():
    torch.manual_seed(4)
    hs, ht = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mse_ref = ((hs.double() - ht.double()) ** 2).mean(-1)[mask].mean()
    cos_ref = (1 - torch.nn.functional.cosine_similarity(hs.double(), ht.double(), dim=-1))[mask].mean()
    assert float(hidden_state_loss(hs, ht, "mse", mask)) == pytest.approx(float(mse_ref), rel=1e-5)
    assert float(hidden_state_loss(hs, ht, "cosine", mask)) == pytest.approx(float(cos_ref), rel=1e-5)
    a_s = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    a_t = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    att_ref = _kl64(a_t.double(), a_s.double()).mean(1)[mask].mean()
    assert float(attention_loss(a_s, a_t, mask)) == pytest.approx(float(att_ref), rel=1e-4)
    with pytest.raises(ValueError, match="heads must align"):
        attention_loss(a_s, a_t[:, :2])


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"temperature": -1.0}, "temperature"), ({"beta": 1.5}, "beta"), ({"kind": "l1"}, "kind")]
)
def test_distillation_loss_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), **kwargs)
