"""SeqGAN's discriminator: a CNN over token embeddings, max-over-time pooling, a highway layer, dropout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAPER_FILTER_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20)
PAPER_NUM_FILTERS = (100, 200, 200, 200, 200, 100, 100, 100, 100, 100, 160, 160)


class CNNDiscriminator(nn.Module):
    """The paper's discriminator (Yu et al. 2017, after Kim 2014): returns logits ``(B, 2)`` (fake, real).

    Convolutions of each width over the embedded sequence ``(B, T, E)``, ReLU, max over time,
    concatenated into ``(B, F)`` features; a highway layer; dropout; a linear layer to 2 classes.
    ``l2_output`` is the L2 weight on the output layer that `l2_penalty` returns (paper: 0.2).

    Example::

        D = CNNDiscriminator(vocab_size=5000)        # the paper's filters and widths
        p_real = D(tokens).softmax(-1)[:, 1]         # (B,)
    """

    def __init__(
        self,
        vocab_size: int = 5000,
        embedding_dim: int = 64,
        filter_sizes: Sequence[int] = PAPER_FILTER_SIZES,
        num_filters: Sequence[int] = PAPER_NUM_FILTERS,
        dropout: float = 0.25,
        l2_output: float = 0.2,
    ) -> None:
        super().__init__()
        if len(filter_sizes) != len(num_filters) or not filter_sizes:
            raise ValueError(
                f"`filter_sizes` and `num_filters` must be non-empty and of equal length, got {len(filter_sizes)} and {len(num_filters)}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r} (the paper keeps 0.75: dropout 0.25).")
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, n, k) for k, n in zip(filter_sizes, num_filters))
        self.max_width = max(filter_sizes)
        features = sum(num_filters)
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
        for layer in (*self.convs, self.output):
            nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
            nn.init.constant_(layer.bias, 0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens).transpose(1, 2)  # (B, E, T)
        if x.shape[-1] < self.max_width:  # sequences shorter than a filter
            x = F.pad(x, (0, self.max_width - x.shape[-1]))
        pooled = torch.cat([F.relu(conv(x)).amax(dim=-1) for conv in self.convs], dim=1)  # (B, F)
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
