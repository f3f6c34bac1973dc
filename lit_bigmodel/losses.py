"""Losses as small, tested functions. Shapes: B batch, T time, V vocabulary, C classes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the labelled positions (completion-only loss).

    Args:
        logits: ``(B, T, V)`` scores for the token after each position.
        labels: ``(B, T)`` token ids aligned with the inputs (shifted here, as Hugging Face does);
            ``ignore_index`` marks prompt and padding positions, which contribute nothing.

    Returns:
        ``(loss, num_tokens)``: the mean over labelled tokens (0 if there are none) and their count.

    Example::

        loss, n = causal_lm_loss(torch.randn(2, 5, 11), torch.tensor([[-100, -100, 3, 4, 2]] * 2))
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    total = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=ignore_index, reduction="sum")
    num_tokens = (shift_labels != ignore_index).sum()
    return total / num_tokens.clamp(min=1), num_tokens


# ----------------------------------------------------------------------------- distillation
# Shapes: student / teacher logits (..., V) — (B, T, V) for language models, (B, C) for classifiers;
# ``mask`` (...) bool selects the positions that count (completion tokens). Every loss returns the
# mean over selected positions of a per-position divergence (summed over the vocabulary).


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def _restrict_to_top_k(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int | None, teacher_indices: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over the teacher's top-k tokens only (renormalised there), or unchanged."""
    if teacher_indices is not None:  # teacher_logits already hold the top-k values
        return student_logits.gather(-1, teacher_indices), teacher_logits
    if top_k is None or top_k >= teacher_logits.shape[-1]:
        return student_logits, teacher_logits
    values, indices = teacher_logits.topk(top_k, dim=-1)  # (..., k)
    return student_logits.gather(-1, indices), values


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    top_k: int | None = None,
    teacher_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between teacher and student predictions, scaled by T² (Hinton et al.).

    Args:
        kind: ``"forward_kl"`` KL(p_T ‖ p_S); ``"reverse_kl"`` KL(p_S ‖ p_T); ``"jsd"`` the
            generalized Jensen–Shannon divergence of GKD, β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m) with
            m = β·p_T + (1−β)·p_S (β=0 is forward KL, β=1 reverse KL, as in TRL); ``"mse"`` the mean
            squared difference of the logits / T (times T², like the others).
        temperature: softens both distributions (logits / T); must be > 0.
        mask: ``(...)`` bool, positions that count.
        top_k: keep only the teacher's k most likely tokens; both distributions are renormalised
            over them.
        teacher_indices: ``(..., k)`` token ids when ``teacher_logits`` are already top-k values
            (the offline cache).

    Returns:
        a scalar: the mean over selected positions.

    Example::

        loss = distillation_loss(s_logits, t_logits, "jsd", temperature=2.0, beta=0.5, mask=labels != -100)
    """
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta!r}.")
    student, teacher = _restrict_to_top_k(student_logits.float(), teacher_logits.float(), top_k, teacher_indices)
    student, teacher = student / temperature, teacher / temperature
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(-1)
    else:
        log_p_s = F.log_softmax(student, dim=-1)
        log_p_t = F.log_softmax(teacher, dim=-1)
        if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
            per_position = _kl(log_p_t, log_p_s)
        elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
            per_position = _kl(log_p_s, log_p_t)
        elif kind == "jsd":
            log_m = torch.logsumexp(torch.stack([log_p_t + math.log(beta), log_p_s + math.log(1 - beta)]), dim=0)
            per_position = beta * _kl(log_p_t, log_m) + (1 - beta) * _kl(log_p_s, log_m)
        else:
            raise ValueError(f"`kind` must be one of {DISTILLATION_LOSSES}, got {kind!r}.")
    return temperature**2 * _masked_mean(per_position, mask)


DISTILLATION_LOSSES = ("forward_kl", "reverse_kl", "jsd", "mse")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) summed over the last dimension, from log-probabilities; 0·log 0 counts as 0."""
    return (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1)


def hidden_state_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Match hidden states ``(B, T, D)`` (the student's already projected to the teacher's width).

    ``"mse"``: mean over selected positions of the mean squared difference over D; ``"cosine"``:
    mean of 1 − cosine similarity.
    """
    if kind == "mse":
        per_position = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    elif kind == "cosine":
        per_position = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    else:
        raise ValueError(f"`kind` must be 'mse' or 'cosine', got {kind!r}.")
    return _masked_mean(per_position, mask)


def attention_loss(
    student_attention: torch.Tensor, teacher_attention: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher ‖ student) between attention maps ``(B, H, T, T)`` (rows are distributions over keys).

    ``mask`` ``(B, T)`` selects the query positions that count. Heads must align (same H).
    """
    if student_attention.shape != teacher_attention.shape:
        raise ValueError(
            f"attention maps must have the same shape (heads must align), got {tuple(student_attention.shape)} "
            f"and {tuple(teacher_attention.shape)}."
        )
    eps = 1e-12
    p_t = teacher_attention.float()
    per_row = (p_t * ((p_t + eps).log() - (student_attention.float() + eps).log())).sum(-1)  # (B, H, T)
    per_position = per_row.mean(1)  # (B, T)
    return _masked_mean(per_position, mask)


# ----------------------------------------------------------------------------- policy gradient
def policy_gradient_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rewards: torch.Tensor,
    baseline: torch.Tensor | float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """REINFORCE loss: −Σ_t log π(y_t | y_<t) · (r_t − b), SeqGAN's generator objective.

    Args:
        logits: ``(B, T, V)`` teacher-forced logits of the sampled ``tokens`` ``(B, T)``.
        rewards: ``(B, T)``, treated as constants (no gradient flows into them).
        baseline: subtracted from the rewards (a number, or a tensor broadcastable to ``(B, T)``).
        mask: ``(B, T)`` bool, tokens that count.
        reduction: ``"mean"`` over counted tokens, or ``"sum"`` (the released SeqGAN code).

    Example::

        loss = policy_gradient_loss(generator(samples), samples, rewards, baseline=rewards.mean())
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]  # (B, T)
    advantage = rewards.detach().float()
    if baseline is not None:
        advantage = advantage - baseline
    weighted = log_probs * advantage
    if mask is not None:
        weighted = weighted * mask.to(weighted.dtype)
    total = -weighted.sum()
    if reduction == "sum":
        return total
    count = mask.sum().clamp(min=1) if mask is not None else torch.tensor(float(tokens.numel()))
    return total / count
