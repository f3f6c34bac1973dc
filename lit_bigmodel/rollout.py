"""Monte Carlo rollout rewards for SeqGAN, batched over every prefix and rollout at once.

For a sampled sequence y_1..y_T, the reward of token t < T is the mean, over N continuations of
y_1..y_t sampled from the rollout policy, of the discriminator's P(real) of the completed
sequence; the reward of token T is D's P(real) of y itself (Yu et al. 2017, eq. 4).

Batched: the prefixes are read once (`LSTMGenerator.prefix_states`), all B × (T−1) × N
continuations are sampled together — rows ordered by prefix length, so at step s only the rows
that still have tokens to write are advanced — and D scores all of them in one call. The loop over
time steps stays (sampling is sequential); there is no Python loop over rollouts or prefixes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lit_bigmodel.nets.cnn_discriminator import CNNDiscriminator
from lit_bigmodel.nets.lstm import LSTMGenerator, sample_categorical


def make_rollout_policy(generator: nn.Module) -> nn.Module:
    """A frozen copy of the generator, to be moved towards it with `update_rollout_policy`."""
    policy = copy.deepcopy(generator)
    policy.requires_grad_(False)
    return policy.eval()


@torch.no_grad()
def update_rollout_policy(policy: nn.Module, generator: nn.Module, rate: float = 0.8) -> None:
    """``policy ← rate · policy + (1 − rate) · generator`` (embeddings copied outright), as SeqGAN's code does."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"`rate` must be in [0, 1], got {rate!r}.")
    for (name, target), source in zip(policy.state_dict().items(), generator.state_dict().values()):
        if not target.is_floating_point() or "embed" in name or "wte" in name:
            target.copy_(source)
        else:
            target.mul_(rate).add_(source, alpha=1 - rate)


def _real_probability(discriminator: nn.Module, tokens: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    if isinstance(discriminator, CNNDiscriminator):
        return discriminator.real_probability(tokens, chunk_size)
    parts = tokens.split(chunk_size) if chunk_size else (tokens,)
    return torch.cat([torch.softmax(_logits(discriminator(part)).float(), -1)[:, -1] for part in parts])


def _logits(output: object) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output  # type: ignore[return-value]


@torch.no_grad()
def monte_carlo_rewards(
    policy: nn.Module,
    discriminator: nn.Module,
    samples: torch.Tensor,
    num_rollouts: int = 16,
    generator: torch.Generator | None = None,
    chunk_size: int | str | None = "auto",
    return_rollouts: bool = False,
    rows_per_chunk: int | str | None = "auto",
) -> torch.Tensor:
    """Rewards ``(B, T)`` for ``samples`` ``(B, T)``; with ``return_rollouts``, also the per-rollout ``(B, T-1, N)``.

    ``policy`` is an `LSTMGenerator` (fast path: continues from cached states) or any module whose
    ``forward(tokens)`` returns teacher-forced logits ``(B, T, V)`` (e.g. `HFCausalLMGenerator`).
    ``chunk_size`` bounds the rows D scores at a time; ``rows_per_chunk`` the continuations sampled
    together (see `_rollout_sequences`); neither is a loop over rollouts or prefixes. ``"auto"``:
    all at once on a GPU; 1,024 and 512 rows on a CPU, where big (rows, V) tensors fall out of cache
    (measured 2–3× faster there by ``benchmarks/seqgan_rollouts.py``).

    Example::

        rewards = monte_carlo_rewards(rollout_policy, D, generator.sample(64), num_rollouts=16)  # (64, 20)
    """
    if num_rollouts < 1:
        raise ValueError(f"`num_rollouts` must be >= 1, got {num_rollouts!r}.")
    batch, length = samples.shape
    on_cpu = samples.device.type == "cpu"
    if chunk_size == "auto":
        chunk_size = 1024 if on_cpu else None
    if rows_per_chunk == "auto":
        rows_per_chunk = 512 if on_cpu else None
    assert chunk_size is None or isinstance(chunk_size, int)
    assert rows_per_chunk is None or isinstance(rows_per_chunk, int)
    was_training = discriminator.training
    discriminator.eval()
    try:
        final = _real_probability(discriminator, samples, chunk_size)  # (B,)
        if length == 1:
            rewards = final[:, None]
            return (rewards, rewards.new_zeros(batch, 0, num_rollouts)) if return_rollouts else rewards  # type: ignore[return-value]
        rows = _rollout_sequences(
            policy, samples, num_rollouts, generator, rows_per_chunk
        )  # ((T-1)·B·N, T), prefix-major
        scores = _real_probability(discriminator, rows, chunk_size)
    finally:
        discriminator.train(was_training)
    per_rollout = scores.view(length - 1, batch, num_rollouts).permute(1, 0, 2)  # (B, T-1, N)
    rewards = torch.cat([per_rollout.mean(dim=-1), final[:, None]], dim=1)  # (B, T)
    if return_rollouts:
        return rewards, per_rollout  # type: ignore[return-value]
    return rewards


def _rollout_sequences(
    policy: nn.Module,
    samples: torch.Tensor,
    num_rollouts: int,
    generator: torch.Generator | None,
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    """All continuations: row (t-1)·B·N + b·N + n keeps ``samples[b, :t]`` and samples the rest.

    Rows are ordered by prefix length, so at step s the rows that still write a token are a
    leading slice. ``rows_per_chunk`` advances that many rows at a time (on a CPU, a few thousand
    rows keep the (rows, V) softmax in cache; on a GPU, None: all at once).
    """
    batch, length = samples.shape
    per_prefix = batch * num_rollouts
    total = per_prefix * (length - 1)
    sequences = samples.repeat_interleave(num_rollouts, dim=0).repeat(length - 1, 1)  # (R, T)
    prefix_len = torch.arange(1, length, device=samples.device).repeat_interleave(per_prefix)  # (R,), ascending
    chunk = rows_per_chunk or total
    if isinstance(policy, LSTMGenerator):
        h, c = policy.prefix_states(samples)  # (B, T, H): after y_1..y_t
        h = h[:, : length - 1].transpose(0, 1).repeat_interleave(num_rollouts, dim=1).reshape(total, -1)
        c = c[:, : length - 1].transpose(0, 1).repeat_interleave(num_rollouts, dim=1).reshape(total, -1)
        for first in range(0, total, chunk):
            last = min(total, first + chunk)
            rows = torch.arange(first, last, device=samples.device)
            state = (h[None, first:last], c[None, first:last])  # (1, rows, H)
            logits = policy.output(h[first:last])  # (rows, V): predicts index prefix_len
            for step in range(length - 1):
                active = min(last, per_prefix * (length - 1 - step)) - first  # rows whose prefix still leaves room
                if active <= 0:
                    break
                token = sample_categorical(logits[:active], generator)
                sequences[rows[:active], prefix_len[first : first + active] + step] = token
                keep = min(last, per_prefix * (length - 2 - step)) - first
                if keep <= 0:
                    break
                state = (state[0][:, :keep], state[1][:, :keep])
                logits, state = policy.step(token[:keep], state)
        return sequences
    rows = torch.arange(total, device=samples.device)
    for step in range(length - 1):  # any teacher-forced generator: recompute over the whole row
        active = per_prefix * (length - 1 - step)
        position = prefix_len[:active] + step
        logits = _logits(policy(sequences[:active]))  # (R', T, V)
        token = sample_categorical(logits[rows[:active], position], generator)
        sequences[rows[:active], position] = token
    return sequences
