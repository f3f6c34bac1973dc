"""`HFCausalLMGenerator`: any Hugging Face causal LM as a SeqGAN generator of fixed-length sequences."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_bigmodel.nets.builders import ModelSource, build_model
from lit_bigmodel.nets.lstm import sample_categorical


class HFCausalLMGenerator(nn.Module):
    """Wrap a causal LM so it has `LSTMGenerator`'s interface: ``forward(tokens)`` → teacher-forced
    logits ``(B, T, V)``, ``sample(num)`` → ``(num, T)``, ``sequence_nll(tokens)`` → ``(B,)``.

    Sequences start from ``start_token`` (default: the model's BOS id, else 0), which is not part
    of the returned tokens.

    Example::

        G = HFCausalLMGenerator(GPT2Config(vocab_size=5000, n_layer=2, n_embd=64, n_head=2), seq_len=20)
    """

    def __init__(self, model: ModelSource, seq_len: int = 20, start_token: int | None = None) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"`seq_len` must be >= 1, got {seq_len!r}.")
        network: Any = build_model(model, "causal_lm")
        self.model = network
        config = network.config
        self.vocab_size: int = int(network.get_output_embeddings().out_features)
        self.seq_len = seq_len
        bos = getattr(config, "bos_token_id", None)
        self.start_token = (
            start_token if start_token is not None else (bos if isinstance(bos, int) and bos < self.vocab_size else 0)
        )

    def shifted_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        start = tokens.new_full((tokens.shape[0], 1), self.start_token)
        return torch.cat([start, tokens[:, :-1]], dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=self.shifted_inputs(tokens)).logits  # (B, T, V)

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        device = next(self.parameters()).device
        sequence = torch.full((num, 1), self.start_token, dtype=torch.long, device=device)
        past = None
        for _ in range(self.seq_len):
            out = self.model(
                input_ids=sequence[:, -1:] if past is not None else sequence, past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            token = sample_categorical(out.logits[:, -1] / temperature, generator)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
        return sequence[:, 1:]

    def sequence_nll(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1), reduction="none")
        return nll.view(tokens.shape).mean(dim=1)
