import math

import torch

from lit_bigmodel.losses import IGNORE_INDEX, causal_lm_loss


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
