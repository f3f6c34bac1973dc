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
    # The labels move left instead of the logits: no copy of the (B, T, V) logits; the last position scores nothing.
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, V), a view when contiguous
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)  # (B*T,)
    total = F.cross_entropy(flat_logits.float(), shift_labels, ignore_index=ignore_index, reduction="sum")
    num_tokens = (shift_labels != ignore_index).sum()
    return total / num_tokens.clamp(min=1), num_tokens


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss` of ``hidden @ weight.T``, computed without ever holding the full ``(B, T, V)`` logits.

    The LM head and the cross-entropy run over ``chunk_size`` tokens at a time. With gradients
    enabled, each chunk's gradients (of ``hidden`` and ``weight``) are computed in the same pass as
    its loss, so no chunk's ``(chunk, V)`` logits are kept for backward and the head's matmul is not
    recomputed (three matmuls, as in the plain path, where checkpointing each chunk would need
    four). Peak extra memory: one chunk's logits in float32 plus a float32 ``(V, D)`` gradient.
    Under autocast the head runs in the autocast dtype and the softmax in float32, as
    ``causal_lm_loss`` does on the logits of an autocast ``nn.Linear``.

    Args:
        hidden: ``(B, T, D)`` final hidden states (the input of the LM head).
        weight: ``(V, D)`` the LM head's weight (tied or not); a head with a bias is not supported.
        labels: ``(B, T)`` token ids aligned with the inputs (shifted here); ``ignore_index`` is skipped.
        chunk_size: tokens per chunk (> 0); larger is faster and uses more memory.

    Returns:
        ``(loss, num_tokens)``, as ``causal_lm_loss``.

    Example::

        hidden = model.transformer(input_ids).last_hidden_state      # (B, T, D)
        loss, n = chunked_causal_lm_loss(hidden, model.lm_head.weight, labels, chunk_size=2048)
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}.")
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)  # (B*T,): position t predicts t + 1
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, D), a view
    dtype = _autocast_dtype(flat.device.type) or torch.promote_types(flat.dtype, weight.dtype)
    if torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad):
        loss, num_tokens = _LinearCrossEntropy.apply(flat, weight, targets, chunk_size, ignore_index, dtype)
        return loss, num_tokens
    with torch.no_grad():
        loss, num_tokens, _, _ = _linear_cross_entropy(flat, weight, targets, chunk_size, ignore_index, dtype, False)
    return loss, num_tokens


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmuls to on ``device_type``, or None when autocast is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    dtype: torch.dtype,
    with_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, and optionally its gradients.

    Shapes: hidden ``(N, D)``, weight ``(V, D)``, targets ``(N,)``. Returns ``(loss, num_tokens,
    grad_hidden (N, D) or None, grad_weight (V, D) float32 or None)``, the gradients of ``loss``.
    """
    valid = targets != ignore_index  # (N,)
    num_tokens = valid.sum()
    scale = 1.0 / num_tokens.clamp(min=1).float()  # a device tensor: no host sync
    safe_targets = targets.masked_fill(~valid, 0)
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(h) if with_grads else None
        grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if with_grads else None
        for start in range(0, h.shape[0], chunk_size):
            h_chunk, rows = h[start : start + chunk_size], slice(start, start + chunk_size)
            logits = (h_chunk @ w.T).float()  # (n, V), the only full-vocabulary tensor, one chunk at a time
            log_z = logits.logsumexp(-1)  # (n,)
            picked = logits.gather(1, safe_targets[rows, None])[:, 0]  # (n,)
            chunk_valid = valid[rows]
            total = total + ((log_z - picked) * chunk_valid).sum()
            if grad_hidden is None or grad_weight is None:
                continue
            # d(loss)/d(logits) = (softmax - one_hot(target)) / num_tokens on labelled rows, 0 elsewhere
            grad_logits = logits.sub_(log_z[:, None]).exp_()  # softmax, in place: (n, V)
            grad_logits.scatter_add_(1, safe_targets[rows, None], -torch.ones_like(picked[:, None]))
            grad_logits = grad_logits.mul_((chunk_valid * scale)[:, None]).to(dtype)
            grad_hidden[rows] = grad_logits @ w  # (n, D)
            grad_weight += (grad_logits.T @ h_chunk).float()  # (V, D)
    return total * scale, num_tokens, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked LM head + cross-entropy whose gradients are computed in the forward pass (see above)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss, num_tokens, grad_hidden, grad_weight = _linear_cross_entropy(
            hidden, weight, targets, chunk_size, ignore_index, dtype, with_grads=True
        )
        assert grad_hidden is not None and grad_weight is not None
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(num_tokens)
        return loss, num_tokens

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor, grad_count: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors  # type: ignore[attr-defined]
        hidden_dtype, weight_dtype = ctx.dtypes  # type: ignore[attr-defined]
        return (
            (grad_hidden * grad_loss).to(hidden_dtype),
            (grad_weight * grad_loss).to(weight_dtype),
            None,
            None,
            None,
            None,
        )


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

        loss = distillation_loss(s_logits, t_logits, "jsd", temperature=2.0, beta=0.5, mask=labels != IGNORE_INDEX)
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
def discriminator_loss(
    discriminator: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SeqGAN's D objective on one update's rows: ``(loss + L2 penalty, loss, accuracy)``, the last two detached.

    Cross-entropy of ``discriminator(tokens)`` ``(B, 2)`` against ``labels`` ``(B,)`` (1 = real), plus the
    discriminator's ``l2_penalty()`` where it has one (the paper's CNN: L2 0.2 on its output layer).

    Example::

        total, loss, accuracy = discriminator_loss(D, tokens, labels)
        total.backward()
    """
    logits = discriminator(tokens)
    loss = F.cross_entropy(logits.float(), labels)
    l2_penalty = getattr(discriminator, "l2_penalty", None)
    penalty = l2_penalty() if callable(l2_penalty) else 0.0
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss + penalty, loss.detach(), accuracy


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
