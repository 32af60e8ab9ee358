"""Distillation and RL losses as pure tensor functions (fp32 math, no module state).

Shapes: B sequences, T completion positions, V vocabulary entries. `*_logp_BTV` are
log-probabilities from `log_softmax_chunked`; `y_BT` are the sampled completion tokens;
`mask_BT` is 1 on completion tokens and 0 on padding. A teacher with a larger (padded)
vocabulary must be sliced to the student's V *before* calling anything here
(`teacher_logits[..., :V_student]`); its padded rows carry no trained mass, and the log-softmax
renormalizes over the shared rows.

Every per-token function returns a `[B, T]` tensor that is 0 where `mask_BT` is 0 (when given).
`token_mean` reduces it by the completion-token count of the *whole accumulated batch*, so
micro-batching never changes the gradient (TRL #4719). Formulas and tests: docs/losses.md.

Example::

    logp_s = log_softmax_chunked(student_logits_BTV, chunk=4096)
    logp_t = log_softmax_chunked(teacher_logits_BTV[..., :logp_s.shape[-1]], chunk=4096)
    loss = token_mean(reverse_kl(logp_s, logp_t), mask_BT, num_tokens=total_completion_tokens)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSS_KINDS = ("reverse_kl", "forward_kl", "jsd", "topk_reverse_kl", "sampled", "k2", "k3")

# Stand-in for log(0) where -inf would give nan gradients (topk tail with k = V).
_LOG_ZERO = -1e30
# expm1 overflows fp32 above ~88; larger log-ratios use the JSD's log-space branch anyway.
_EXPM1_MAX = 50.0


def _masked(x_BT: Tensor, mask_BT: Tensor | None) -> Tensor:
    """Zero the positions where `mask_BT` is 0 (with `where`, so nan/inf there cannot leak)."""
    if mask_BT is None:
        return x_BT
    return torch.where(mask_BT.bool(), x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))


def log_softmax_chunked(logits_BTV: Tensor, chunk: int, mask_BT: Tensor | None = None) -> Tensor:
    """fp32 log-softmax over the last axis, `chunk` positions at a time: [B, T, V] -> [B, T, V].

    Chunking bounds the fp32 temporaries (the upcast copy of bf16 logits and softmax
    workspace) to `chunk * V` floats. With `mask_BT`, logits at masked positions are replaced
    by 0 first, so garbage (even inf) at padding never produces nan values or gradients.
    """
    B, T, V = logits_BTV.shape
    flat_NV = logits_BTV.reshape(B * T, V)
    flat_mask_N = None if mask_BT is None else mask_BT.reshape(B * T).bool()
    pieces = []
    for start in range(0, B * T, max(int(chunk), 1)):
        piece = flat_NV[start : start + chunk].float()
        if flat_mask_N is not None:
            piece = torch.where(flat_mask_N[start : start + chunk, None], piece, torch.zeros((), device=piece.device))
        pieces.append(torch.log_softmax(piece, dim=-1))
    if not pieces:
        return logits_BTV.float()
    return torch.cat(pieces, dim=0).reshape(B, T, V)


def reverse_kl(student_logp_BTV: Tensor, teacher_logp_BTV: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """KL(p_s || p_t) per position = sum_v p_s(v) (log p_s(v) - log p_t(v)): [B, T, V] x2 -> [B, T]."""
    logp_s, logp_t = student_logp_BTV.float(), teacher_logp_BTV.float()
    return _masked((logp_s.exp() * (logp_s - logp_t)).sum(-1), mask_BT)


def forward_kl(student_logp_BTV: Tensor, teacher_logp_BTV: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """KL(p_t || p_s) per position = sum_v p_t(v) (log p_t(v) - log p_s(v)): [B, T, V] x2 -> [B, T]."""
    logp_s, logp_t = student_logp_BTV.float(), teacher_logp_BTV.float()
    return _masked((logp_t.exp() * (logp_t - logp_s)).sum(-1), mask_BT)


def _log_mixture_ratio(log_ratio: Tensor, weight: float) -> Tensor:
    """log(M / p) for M = weight * q + (1 - weight) * p, given log_ratio = log q - log p.

    M/p = 1 + u with u = weight * (q/p - 1). Where M is close to p (|u| <= 1/2) this is
    log1p(u), accurate to relative precision: the JSD near its endpoints is built from these
    small values. Elsewhere it is the log-space mixture logaddexp(log(1 - weight), log(weight) +
    log_ratio), which neither overflows (q >> p) nor cancels (M << p). Both form the mixture in
    probability space.
    """
    if weight >= 1.0:
        return log_ratio  # M = q exactly
    u = weight * torch.expm1(log_ratio.clamp(max=_EXPM1_MAX))
    near = torch.log1p(u.clamp(-0.5, 0.5))  # clamped so the unused branch has finite gradients
    far = torch.logaddexp(torch.full_like(log_ratio, math.log1p(-weight)), math.log(weight) + log_ratio)
    return torch.where(u.abs() <= 0.5, near, far)


def generalized_jsd(
    student_logp_BTV: Tensor, teacher_logp_BTV: Tensor, beta: float, mask_BT: Tensor | None = None
) -> Tensor:
    """Continuous generalized JSD(beta) per position: [B, T, V] x2 -> [B, T].

    With M = beta * p_t + (1 - beta) * p_s (in probability space),
        JSD_beta = [beta * KL(p_t || M) + (1 - beta) * KL(p_s || M)] / (beta * (1 - beta)).
    The division makes it continuous on [0, 1]: beta -> 0 gives KL(p_t || p_s) (forward KL),
    beta -> 1 gives KL(p_s || p_t) (reverse KL); without it the value tends to 0 at both ends.
    Each KL(p || M) is evaluated as sum_v p * phi(M/p - 1) with phi(u) = u - log1p(u) >= 0
    (equal because sum_v p * (M/p - 1) = 0), which keeps the O(beta^2) numerator accurate near
    the endpoints. At beta exactly 0 or 1 the vanishing term is dropped (its limit is 0).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    logp_s, logp_t = student_logp_BTV.float(), teacher_logp_BTV.float()
    p_s, p_t = logp_s.exp(), logp_t.exp()
    log_ratio = logp_t - logp_s  # log(p_t / p_s)
    total = torch.zeros(logp_s.shape[:-1], dtype=torch.float32, device=logp_s.device)
    if beta > 0.0:
        # KL(p_s || M) / beta, with M / p_s = 1 + beta * (p_t / p_s - 1); p_s * u = beta * (p_t - p_s).
        log_m_over_s = _log_mixture_ratio(log_ratio, beta)
        total = total + (beta * (p_t - p_s) - p_s * log_m_over_s).sum(-1) / beta
    if beta < 1.0:
        # KL(p_t || M) / (1 - beta), with M / p_t = 1 + (1 - beta) * (p_s / p_t - 1).
        log_m_over_t = _log_mixture_ratio(-log_ratio, 1.0 - beta)
        total = total + ((1.0 - beta) * (p_s - p_t) - p_t * log_m_over_t).sum(-1) / (1.0 - beta)
    return _masked(total, mask_BT)


def topk_reverse_kl(
    student_logp_BTV: Tensor, teacher_logp_BTV: Tensor, k: int, mask_BT: Tensor | None = None
) -> Tensor:
    """Reverse KL over the student's top-k tokens plus one tail bucket: [B, T, V] x2 -> [B, T].

    The tail bucket holds each distribution's mass outside the student's top-k (taken by
    logsumexp over the remaining entries, accurate even when the tail is tiny). Exact when k >= V.
    """
    logp_s, logp_t = student_logp_BTV.float(), teacher_logp_BTV.float()
    k = min(int(k), logp_s.shape[-1])
    top_idx_BTK = logp_s.detach().topk(k, dim=-1).indices
    top_s, top_t = logp_s.gather(-1, top_idx_BTK), logp_t.gather(-1, top_idx_BTK)
    in_top = torch.zeros_like(logp_s, dtype=torch.bool).scatter_(-1, top_idx_BTK, True)
    tail_s = torch.where(in_top, _LOG_ZERO, logp_s).logsumexp(-1, keepdim=True)
    tail_t = torch.where(in_top, _LOG_ZERO, logp_t).logsumexp(-1, keepdim=True)
    buckets_s, buckets_t = torch.cat([top_s, tail_s], -1), torch.cat([top_t, tail_t], -1)
    return _masked((buckets_s.exp() * (buckets_s - buckets_t)).sum(-1), mask_BT)


def sampled_token_logprobs(logp_BTV: Tensor, y_BT: Tensor) -> Tensor:
    """log p(y_t) at the sampled tokens: [B, T, V], [B, T] (int) -> [B, T]."""
    return logp_BTV.float().gather(-1, y_BT.long().unsqueeze(-1)).squeeze(-1)


def k1_policy_gradient(
    student_logp_y_BT: Tensor,
    teacher_logp_y_BT: Tensor,
    old_student_logp_y_BT: Tensor | None = None,
    mask_BT: Tensor | None = None,
) -> Tensor:
    """Sampled-token OPD as a policy gradient (Tinker-style): [B, T] x2(3) -> [B, T].

    advantage = -(log p_old(y) - log p_t(y)), detached; loss = -advantage * log p_s(y).
    `old_student_logp_y_BT` defaults to the current student's (one update per rollout). Its
    gradient's expectation under y ~ p_s equals the gradient of the full reverse KL.
    """
    old = student_logp_y_BT if old_student_logp_y_BT is None else old_student_logp_y_BT
    advantage = -(old.float() - teacher_logp_y_BT.float()).detach()
    return _masked(-advantage * student_logp_y_BT.float(), mask_BT)


def k2(student_logp_y_BT: Tensor, teacher_logp_y_BT: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """k2 = 0.5 * (log p_s(y) - log p_t(y))^2 at the sampled tokens: [B, T] x2 -> [B, T]."""
    diff = student_logp_y_BT.float() - teacher_logp_y_BT.float()
    return _masked(0.5 * diff.square(), mask_BT)


def k3(student_logp_y_BT: Tensor, teacher_logp_y_BT: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """k3 = (r - 1) - log r with r = p_t(y) / p_s(y): [B, T] x2 -> [B, T].

    Unbiased (and >= 0) as a *value* estimate of KL(p_s || p_t) for y ~ p_s; note that its
    gradient, used as a loss, follows the forward KL instead (docs/losses.md).
    """
    log_r = teacher_logp_y_BT.float() - student_logp_y_BT.float()
    return _masked(torch.expm1(log_r) - log_r, mask_BT)


def token_mean(per_token_BT: Tensor, mask_BT: Tensor, num_tokens: int | Tensor) -> Tensor:
    """Sum over valid tokens / `num_tokens` (completion tokens of the whole accumulated batch).

    Summing this over micro-batches gives exactly the one-big-batch mean. With zero tokens it
    returns 0 that still depends on `per_token_BT`, so `backward()` works (all grads 0).
    """
    total = _masked(per_token_BT.float(), mask_BT).sum()
    if isinstance(num_tokens, Tensor):
        return total / num_tokens.to(total.dtype).clamp(min=1)
    return total / max(int(num_tokens), 1)


def sft_loss(student_logp_BTV: Tensor, y_BT: Tensor, mask_BT: Tensor, num_tokens: int | Tensor) -> Tensor:
    """Mean negative log-likelihood of the target tokens `y_BT`: -> scalar."""
    return token_mean(-sampled_token_logprobs(student_logp_BTV, y_BT), mask_BT, num_tokens)


def opd_loss(
    kind: str,
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    y_BT: Tensor,
    mask_BT: Tensor,
    num_tokens: int | Tensor,
    *,
    beta: float = 0.5,
    top_k: int = 32,
    chunk: int = 4096,
    old_student_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One OPD loss over a micro-batch: logits [B, T, V] x2, y/mask [B, T] -> (scalar, stats).

    The teacher's logits must already be sliced to the student's vocabulary.
    `old_student_logp` ([B, T], log p at y of the policy that sampled) is used by kind "sampled"
    only; by default the current student's detached values are used. `stats` hold
    detached scalars normalized like the loss (by `num_tokens`), so summing them over the
    micro-batches of a step gives the step's per-token mean: `reverse_kl` (full vocabulary,
    whatever `kind` is) and `loss`.
    """
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(
            f"opd_loss: student logits {tuple(student_logits_BTV.shape)} and teacher logits "
            f"{tuple(teacher_logits_BTV.shape)} differ; slice the teacher to [..., :V_student] first"
        )
    logp_s = log_softmax_chunked(student_logits_BTV, chunk, mask_BT)
    with torch.no_grad():
        logp_t = log_softmax_chunked(teacher_logits_BTV.detach(), chunk, mask_BT)
    if kind == "reverse_kl":
        per_token = reverse_kl(logp_s, logp_t, mask_BT)
    elif kind == "forward_kl":
        per_token = forward_kl(logp_s, logp_t, mask_BT)
    elif kind == "jsd":
        per_token = generalized_jsd(logp_s, logp_t, beta, mask_BT)
    elif kind == "topk_reverse_kl":
        per_token = topk_reverse_kl(logp_s, logp_t, top_k, mask_BT)
    elif kind in ("sampled", "k2", "k3"):
        s_y, t_y = sampled_token_logprobs(logp_s, y_BT), sampled_token_logprobs(logp_t, y_BT)
        if kind == "sampled":
            per_token = k1_policy_gradient(s_y, t_y, old_student_logp, mask_BT)
        elif kind == "k2":
            per_token = k2(s_y, t_y, mask_BT)
        else:
            per_token = k3(s_y, t_y, mask_BT)
    else:
        raise ValueError(f"opd_loss: unknown kind {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
    loss = token_mean(per_token, mask_BT, num_tokens)
    with torch.no_grad():
        # For kind reverse_kl the statistic is the loss's own per-token values: reuse them rather than
        # run a second pass over [B, T, V] (same function, same inputs: bit-identical).
        rkl = per_token.detach() if kind == "reverse_kl" else reverse_kl(logp_s, logp_t, mask_BT)
        stats = {
            "loss": loss.detach(),
            "reverse_kl": token_mean(rkl, mask_BT, num_tokens),
        }
    return loss, stats


def group_advantages(rewards_N: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO-style advantages: [N] rewards in consecutive groups of `group_size` -> [N].

    adv = (r - group mean) / (group std + eps) (population std: a group of equal rewards gives 0,
    and a 2-sample group gives +-1); without `normalize_std` only the mean is subtracted.
    """
    if group_size < 1 or rewards_N.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards_N.numel()} rewards do not split into groups of {group_size}")
    groups_GS = rewards_N.float().reshape(-1, group_size)
    centered = groups_GS - groups_GS.mean(-1, keepdim=True)
    if normalize_std:
        centered = centered / (groups_GS.std(-1, keepdim=True, correction=0) + eps)
    return centered.reshape(-1)


def policy_gradient_loss(
    logp_y_BT: Tensor, advantages_B: Tensor, mask_BT: Tensor, num_tokens: int | Tensor
) -> Tensor:
    """REINFORCE with a sequence-level advantage: mean over tokens of -adv_b * log p(y_bt) -> scalar."""
    per_token = -advantages_B.detach().float()[:, None] * logp_y_BT.float()
    return token_mean(per_token, mask_BT, num_tokens)


def kl_to_reference(logp_y_BT: Tensor, ref_logp_y_BT: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference) for the RL penalty `rl_kl_coef`: -> [B, T]."""
    return k3(logp_y_BT, ref_logp_y_BT.detach(), mask_BT)
