"""The plain loop of the released SeqGAN code's rollouts: the reference that tests and benchmarks compare
`lit_bigmodel.rollout.monte_carlo_rewards` with (one rollout, one prefix length and one step at a time)."""

from __future__ import annotations

import torch
from torch import nn

from lit_bigmodel.nets.lstm import LSTMGenerator, sample_categorical
from lit_bigmodel.rollout import _logits, _real_probability


@torch.no_grad()
def monte_carlo_rewards_reference(
    policy: nn.Module,
    discriminator: nn.Module,
    samples: torch.Tensor,
    num_rollouts: int = 16,
    generator: torch.Generator | None = None,
    return_rollouts: bool = False,
) -> torch.Tensor:
    """Rewards as `monte_carlo_rewards`, by the plain loop over rollouts, prefixes and steps."""
    batch, length = samples.shape
    was_training = discriminator.training
    discriminator.eval()
    per_rollout = samples.new_zeros((batch, length - 1, num_rollouts), dtype=torch.float)
    for n in range(num_rollouts):
        for t in range(1, length):
            sequence = samples.clone()
            if isinstance(policy, LSTMGenerator):  # step by step: read the prefix, then sample the rest
                token, state = samples.new_full((batch,), policy.start_token), None
                for position in range(length):
                    if position < t:  # the prefix: the LSTM alone, no output layer (as the released code)
                        _, state = policy.lstm(policy.embedding(token)[:, None], state)
                    else:
                        logits, state = policy.step(token, state)
                        sequence[:, position] = sample_categorical(logits, generator)
                    token = sequence[:, position]
            else:
                for position in range(t, length):
                    sequence[:, position] = sample_categorical(_logits(policy(sequence))[:, position], generator)
            per_rollout[:, t - 1, n] = _real_probability(discriminator, sequence, None)
    final = _real_probability(discriminator, samples, None)
    discriminator.train(was_training)
    rewards = torch.cat([per_rollout.mean(dim=-1), final[:, None]], dim=1)
    if return_rollouts:
        return rewards, per_rollout  # type: ignore[return-value]
    return rewards
