"""`GraphedUpdate` and the discriminator's two convolution implementations (the fast D update)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from lit_bigmodel.cuda_graphs import GraphedUpdate
from lit_bigmodel.losses import discriminator_loss
from lit_bigmodel.nets import CNNDiscriminator
from lit_bigmodel.nets.cnn_discriminator import PAPER_FILTER_SIZES, PAPER_NUM_FILTERS


@pytest.mark.parametrize(
    ("filter_sizes", "num_filters", "length"),
    [(PAPER_FILTER_SIZES, PAPER_NUM_FILTERS, 20), ((1, 2, 3), (4, 5, 6), 6), ((1, 5, 8), (3, 3, 3), 4)],
)
def test_unfold_and_conv_are_the_same_function_and_gradient(filter_sizes, num_filters, length):
    torch.manual_seed(0)
    conv = CNNDiscriminator(50, 8, filter_sizes, num_filters, dropout=0.0, impl="conv").double()
    unfold = copy.deepcopy(conv)
    unfold.impl = "unfold"
    tokens = torch.randint(0, 50, (7, length))  # length 4 < width 8: both zero-pad
    a, b = conv(tokens), unfold(tokens)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    for p, q in zip(conv.parameters(), unfold.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    padding = unfold.weight_mask.expand_as(unfold.conv_weight) == 0
    assert int(padding.sum()) > 0 and unfold.conv_weight.grad[padding].abs().max() == 0  # stays zero under Adam


def test_packed_filters_start_with_zero_padding_and_the_paper_sizes():
    d = CNNDiscriminator(5000)
    assert d.conv_weight.shape == (1720, 20, 64)
    padding = d.weight_mask.expand_as(d.conv_weight) == 0
    assert d.conv_weight[padding].abs().max() == 0 and d.conv_weight[~padding].abs().max() > 0
    # the paper's parameter count: embedding, 12 convolutions with biases, highway, output layer
    convs = sum(n * (k * 64 + 1) for k, n in zip(PAPER_FILTER_SIZES, PAPER_NUM_FILTERS))
    expected = 5000 * 64 + convs + 1720 * 3440 + 3440 + 1720 * 2 + 2
    assert sum(int(p.numel()) for p in d.parameters()) - int(padding.sum()) == expected


def test_state_dicts_of_the_per_width_layout_load_into_the_packed_one():
    torch.manual_seed(0)
    packed = CNNDiscriminator(50, 8, (1, 3), (4, 5), dropout=0.0)
    old = {k: v for k, v in packed.state_dict().items() if not k.startswith("conv_")}
    for i, (k, rows) in enumerate(zip((1, 3), (slice(0, 4), slice(4, 9)))):  # the earlier nn.Conv1d(8, n, k)s
        old[f"convs.{i}.weight"] = packed.conv_weight.detach()[rows, :k].transpose(1, 2).clone()
        old[f"convs.{i}.bias"] = packed.conv_bias.detach()[rows].clone()
    loaded = CNNDiscriminator(50, 8, (1, 3), (4, 5), dropout=0.0)
    loaded.load_state_dict(old)
    tokens = torch.randint(0, 50, (3, 6))
    assert torch.equal(loaded(tokens), packed(tokens))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"impl": "cudnn"}, "impl"), ({"filter_sizes": (0, 2), "num_filters": (3, 3)}, "filter_sizes"),
     ({"dropout": 1.0}, "dropout")],
)  # fmt: skip
def test_discriminator_arguments_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        CNNDiscriminator(50, 8, **kwargs)


def _d_setup(device="cpu", dropout=0.0):
    torch.manual_seed(0)
    d = CNNDiscriminator(100, 8, (1, 2, 3), (4, 4, 4), dropout=dropout).to(device)
    tokens = torch.randint(0, 100, (10, 16, 6), device=device)
    labels = torch.randint(0, 2, (10, 16), device=device)
    return d, tokens, labels


def _loss(d):
    return functools.partial(discriminator_loss, d)  # (CE + L2, CE, accuracy)


def test_eager_update_equals_the_plain_loop():
    d, tokens, labels = _d_setup()
    reference = copy.deepcopy(d)
    update = GraphedUpdate(_loss(d), torch.optim.Adam(d.parameters(), 1e-2))
    plain = torch.optim.Adam(reference.parameters(), 1e-2)
    for x, y in zip(tokens, labels):
        total, loss, accuracy = update(x, y)  # on a CPU: eager
        plain.zero_grad()
        logits = reference(x)
        expected = F.cross_entropy(logits, y) + reference.l2_penalty()
        expected.backward()
        plain.step()
        assert torch.equal(total, expected.detach()) and torch.equal(loss, F.cross_entropy(logits, y).detach())
        assert float(accuracy) == float((logits.argmax(-1) == y).float().mean())
    assert update.captures == 0
    for p, q in zip(d.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_graphed_update_arguments_are_checked():
    d, _, _ = _d_setup()
    with pytest.raises(ValueError, match=r"`optimizer`.*SGD"):
        GraphedUpdate(_loss(d), torch.optim.SGD(d.parameters(), 0.1))
    with pytest.raises(ValueError, match="`warmup`"):
        GraphedUpdate(_loss(d), torch.optim.Adam(d.parameters()), warmup=0)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["conv", "unfold"])
def test_graph_replay_equals_eager_updates_and_recaptures_when_it_must(impl):
    d, tokens, labels = _d_setup("cuda")
    d.impl = impl
    reference = copy.deepcopy(d)
    update = GraphedUpdate(_loss(d), torch.optim.Adam(d.parameters(), 1e-2, fused=True))
    eager = GraphedUpdate(_loss(reference), torch.optim.Adam(reference.parameters(), 1e-2, fused=True), enabled=False)
    for step, (x, y) in enumerate(zip(tokens, labels)):
        if step == 5:  # a new learning rate is baked into a new graph
            for opt in (update.optimizer, eager.optimizer):
                opt.param_groups[0]["lr"] = 5e-3
        n = 11 if step == 7 else 16  # another shape runs eagerly
        loss, _, _ = update(x[:n], y[:n])
        expected, _, _ = eager(x[:n], y[:n])
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert update.captures == 2
    for p, q in zip(d.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_graph_capture_undoes_its_warmup_and_follows_a_loaded_optimizer_state():
    d, tokens, labels = _d_setup("cuda", dropout=0.25)
    optimizer = torch.optim.Adam(d.parameters(), 1e-2)
    update = GraphedUpdate(_loss(d), optimizer)
    before = [p.detach().clone() for p in d.parameters()]
    update(tokens[0], labels[0])
    state = optimizer.state[d.conv_weight]
    assert int(state["step"]) == 1  # the warm-up's three steps were undone
    moved = [(p - b).abs().max() for p, b in zip(d.parameters(), before)]
    assert max(moved) <= 1e-2 * 1.01  # one Adam step of lr 1e-2 at most, not four
    saved = copy.deepcopy(optimizer.state_dict())
    update(tokens[1], labels[1])
    optimizer.load_state_dict(saved)  # new state tensors: the old graph would update the old ones
    update(tokens[2], labels[2])
    assert update.captures == 2 and int(optimizer.state[d.conv_weight]["step"]) == 2
