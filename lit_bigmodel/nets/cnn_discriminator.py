"""SeqGAN's discriminator: a CNN over token embeddings, max-over-time pooling, a highway layer, dropout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PAPER_FILTER_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20)
PAPER_NUM_FILTERS = (100, 200, 200, 200, 200, 100, 100, 100, 100, 100, 160, 160)
IMPLS = ("auto", "conv", "unfold")


class CNNDiscriminator(nn.Module):
    """The paper's discriminator (Yu et al. 2017, after Kim 2014): returns logits ``(B, 2)`` (fake, real).

    Convolutions of each width over the embedded sequence ``(B, T, E)``, ReLU, max over time,
    concatenated into ``(B, F)`` features; a highway layer; dropout; a linear layer to 2 classes.
    ``l2_output`` is the L2 weight on the output layer that `l2_penalty` returns (paper: 0.2).

    The filters of every width are stored packed in one ``conv_weight`` ``(F, max width, E)`` (the
    part of a row beyond its filter's width is zero and stays zero) with ``conv_bias`` ``(F,)``.
    ``impl`` chooses how the convolutions run; both compute the same function:

    - ``"conv"``: one ``conv1d`` per width — the least arithmetic, the choice on a CPU;
    - ``"unfold"``: every filter as one matmul over zero-padded windows of the maximum width, with
      each filter's out-of-range positions masked before the max — ~6× the arithmetic of
      ``"conv"`` for the paper's widths but 4 kernels instead of 36, the choice where kernel launches
      dominate (a 64-row D update on a GPU; ``benchmarks/seqgan_dstep.py`` measures both);
    - ``"auto"``: ``"unfold"`` on CUDA for at most 32,768 window positions (rows × padded length:
      a 64-row update of 20 tokens has 1,280; its windows tensor is positions × max width × E
      floats), else ``"conv"``. The GPU choice follows DESIGN.md's H100 probe of a 64-row update
      (unfold 3.4 ms vs convolutions 6.9 ms eager, 1.3 vs 1.8 ms under CUDA graphs from
      ``torch.compile``), not a measurement of this class.

    State dicts of the earlier layout (one ``convs.<i>`` ``Conv1d`` per width) load into the packed one.

    Example::

        D = CNNDiscriminator(vocab_size=5000)        # the paper's filters and widths
        p_real = D(tokens).softmax(-1)[:, 1]         # (B,)
    """

    filter_widths: torch.Tensor  # buffers
    weight_mask: torch.Tensor

    def __init__(
        self,
        vocab_size: int = 5000,
        embedding_dim: int = 64,
        filter_sizes: Sequence[int] = PAPER_FILTER_SIZES,
        num_filters: Sequence[int] = PAPER_NUM_FILTERS,
        dropout: float = 0.25,
        l2_output: float = 0.2,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if len(filter_sizes) != len(num_filters) or not filter_sizes:
            raise ValueError(
                f"`filter_sizes` and `num_filters` must be non-empty and of equal length, got {len(filter_sizes)} and {len(num_filters)}."
            )
        if min(filter_sizes) < 1 or min(num_filters) < 1:
            raise ValueError(
                f"`filter_sizes` and `num_filters` must be >= 1, got {tuple(filter_sizes)} and {tuple(num_filters)}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r} (the paper keeps 0.75: dropout 0.25).")
        if impl not in IMPLS:
            raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}.")
        self.impl = impl
        self.filter_sizes, self.num_filters = tuple(filter_sizes), tuple(num_filters)
        self.max_width = max(filter_sizes)
        features = sum(num_filters)
        widths = torch.tensor([k for k, n in zip(filter_sizes, num_filters) for _ in range(n)])  # (F,)
        self.register_buffer("filter_widths", widths, persistent=False)
        self.register_buffer(  # 1 where a packed row holds its filter's weights
            "weight_mask",
            (torch.arange(self.max_width)[None, :] < widths[:, None]).float()[:, :, None],
            persistent=False,
        )  # (F, max width, 1)
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.conv_weight = nn.Parameter(torch.empty(features, self.max_width, embedding_dim))
        self.conv_bias = nn.Parameter(torch.empty(features))
        self.highway = nn.Linear(features, 2 * features)  # transform and gate in one matmul
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(features, 2)
        self.l2_output = l2_output
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released SeqGAN code's initialisation: embedding U(−1, 1); convolution and output weights
        truncated N(0, 0.1²) with biases 0.1; the highway layer keeps PyTorch's default."""
        self.embedding.weight.uniform_(-1.0, 1.0)
        for weight, bias in ((self.conv_weight, self.conv_bias), (self.output.weight, self.output.bias)):
            nn.init.trunc_normal_(weight, std=0.1, a=-0.2, b=0.2)
            nn.init.constant_(bias, 0.1)
        self.conv_weight.mul_(self.weight_mask)

    def _resolve_impl(self, tokens: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        positions = tokens.shape[0] * max(tokens.shape[1], self.max_width)
        return "unfold" if tokens.device.type == "cuda" and positions <= 32_768 else "conv"

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Max-over-time pooled convolution features ``(B, F)``, after ReLU."""
        x = self.embedding(tokens)  # (B, T, E)
        length = max(x.shape[1], self.max_width)  # sequences shorter than a filter are zero-padded
        if self._resolve_impl(tokens) == "conv":
            if length > x.shape[1]:
                x = F.pad(x, (0, 0, 0, length - x.shape[1]))
            x = x.transpose(1, 2)  # (B, E, T')
            weights = self.conv_weight.split(self.num_filters)  # split, not slices: one cat in backward
            biases = self.conv_bias.split(self.num_filters)
            parts = [
                F.relu(F.conv1d(x, weight[:, :k].transpose(1, 2), bias)).amax(dim=-1)
                for k, weight, bias in zip(self.filter_sizes, weights, biases)
            ]
            return torch.cat(parts, dim=1)
        # every window of max width (zero-padded past the end): (B, T', max width · E)
        x = F.pad(x, (0, 0, 0, length + self.max_width - 1 - x.shape[1]))
        windows = x.unfold(1, self.max_width, 1).transpose(2, 3).flatten(2)
        weight = (self.conv_weight * self.weight_mask).flatten(1)  # (F, max width · E)
        activations = F.relu(F.linear(windows, weight, self.conv_bias))  # (B, T', F)
        # a width-k filter has T' − k + 1 positions; the rest read padding and are zeroed (ReLU'd values are >= 0)
        valid = torch.arange(length, device=x.device)[:, None] <= length - self.filter_widths[None, :]  # (T', F)
        return (activations * valid).amax(dim=1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        old = [f"{prefix}convs.{i}.weight" for i in range(len(self.filter_sizes))]
        if f"{prefix}conv_weight" not in state_dict and all(key in state_dict for key in old):
            weights = [state_dict.pop(key) for key in old]  # (n, E, k) each: pad to max width, pack
            state_dict[f"{prefix}conv_weight"] = torch.cat(
                [F.pad(w.transpose(1, 2), (0, 0, 0, self.max_width - w.shape[-1])) for w in weights]
            )
            biases = [state_dict.pop(f"{prefix}convs.{i}.bias") for i in range(len(self.filter_sizes))]
            state_dict[f"{prefix}conv_bias"] = torch.cat(biases)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.features(tokens)
        transform, gate = self.highway(pooled).chunk(2, dim=-1)
        gate = torch.sigmoid(gate)
        features = gate * F.relu(transform) + (1 - gate) * pooled  # highway
        return self.output(self.dropout(features))  # (B, 2)

    def l2_penalty(self) -> torch.Tensor:
        """``l2_output`` · (‖W_out‖² + ‖b_out‖²) / 2, as the paper's code adds to the loss."""
        return self.l2_output * 0.5 * (self.output.weight.pow(2).sum() + self.output.bias.pow(2).sum())

    @torch.no_grad()
    def real_probability(self, tokens: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """P(real) for each sequence ``(B, T)`` → ``(B,)``, in chunks of ``chunk_size`` rows to bound memory."""
        if chunk_size is None or tokens.shape[0] <= chunk_size:
            return F.softmax(self(tokens).float(), dim=-1)[:, 1]
        return torch.cat([self.real_probability(part) for part in tokens.split(chunk_size)])
