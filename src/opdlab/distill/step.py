"""One optimizer step's gradient: score every micro-batch, take the method's loss, backward.

    models = StepModels(student, teacher, reference=None, vocab_size=V, micro_batch=8)
    sums = accumulate_gradients(models, batch, loss_function("opd", cfg.loss))
    sums.loss, sums.reverse_kl            # of the whole step, as if it were one big batch

`batch` is a text `Rollout` or a vision-language `VisualRollout`; both give each model's logits
on the completion tokens (`batch.logits`, `batch.frozen_logits`), so nothing here asks which it holds.
The methods differ only in the loss of one micro-batch, chosen once by `loss_function`:
  opd, opsd  `opd_loss` between the student's and the teacher's distributions (`loss.loss`).
  sft        cross-entropy of the student on the teacher's tokens.
  rl         policy gradient with per-row advantages, plus an optional KL to the frozen source.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from opdlab.config import LossConfig
from opdlab.distill.losses import (
    kl_to_reference, log_softmax_chunked, opd_loss, policy_gradient_loss, reverse_kl, sampled_token_logprobs,
    sft_loss, token_mean,
)
from opdlab.distill.rollout import Rollout
from opdlab.distill.vlm import VisualRollout

Batch = Rollout | VisualRollout


@dataclass
class StepModels:
    """The models a step runs, and how it runs them.

    student: the model being trained (one forward with autograd per micro-batch).
    teacher: the frozen scorer of every completion (`batch.frozen_logits(teacher, "teacher", ...)`).
    reference: the frozen source of the student (method rl with `loss.rl_kl_coef` > 0), else None.
    vocab_size: the vocabulary rows student and teacher share; logits are cut to these.
    micro_batch: rows per forward/backward pass.
    """

    student: Any
    teacher: Any
    reference: Any | None
    vocab_size: int
    micro_batch: int


@dataclass
class MicroBatch:
    """What a method's loss reads for one micro-batch: [B, C] targets and mask, [B, C, V] logits."""

    targets_BC: Tensor
    mask_BC: Tensor
    student_logits_BCV: Tensor
    teacher_logits_BCV: Tensor
    reference_logits_BCV: Tensor | None
    advantages_B: Tensor | None


class StepSums(NamedTuple):
    """A step's loss and reverse KL (each already per completion token of the step), and its seconds."""

    loss: float
    reverse_kl: float
    score_s: float
    update_s: float


# (micro-batch, the step's completion tokens) -> (loss, reverse-KL statistic), both / those tokens
MicroBatchLoss = Callable[[MicroBatch, int], tuple[Tensor, Tensor]]


def loss_function(method: str, cfg: LossConfig) -> MicroBatchLoss:
    """The micro-batch loss of `method` (opd, opsd, sft, rl)."""
    if method in ("opd", "opsd"):
        return partial(distillation_loss, cfg)
    if method == "sft":
        return partial(supervised_loss, cfg)
    if method == "rl":
        return partial(reinforce_loss, cfg)
    raise ValueError(f"loss_function: unknown method {method!r}")


def distillation_loss(cfg: LossConfig, mb: MicroBatch, num_tokens: int) -> tuple[Tensor, Tensor]:
    """opd/opsd: `cfg.loss` between student and teacher on every completion token."""
    loss, stats = opd_loss(cfg.loss, mb.student_logits_BCV, mb.teacher_logits_BCV, mb.targets_BC, mb.mask_BC,
                           num_tokens, beta=cfg.beta, top_k=cfg.top_k, chunk=cfg.vocab_chunk)
    return loss, stats["reverse_kl"]


def _student_logp_and_kl(cfg: LossConfig, mb: MicroBatch, num_tokens: int) -> tuple[Tensor, Tensor]:
    """The student's log-probabilities [B, C, V] and the teacher-student reverse KL (no autograd)."""
    logp_s = log_softmax_chunked(mb.student_logits_BCV, cfg.vocab_chunk, mb.mask_BC)
    with torch.no_grad():
        logp_t = log_softmax_chunked(mb.teacher_logits_BCV, cfg.vocab_chunk, mb.mask_BC)
        kl = token_mean(reverse_kl(logp_s.detach(), logp_t, mb.mask_BC), mb.mask_BC, num_tokens)
    return logp_s, kl


def supervised_loss(cfg: LossConfig, mb: MicroBatch, num_tokens: int) -> tuple[Tensor, Tensor]:
    """sft: cross-entropy of the student on the (teacher-written) completion tokens."""
    logp_s, kl = _student_logp_and_kl(cfg, mb, num_tokens)
    return sft_loss(logp_s, mb.targets_BC, mb.mask_BC, num_tokens), kl


def reinforce_loss(cfg: LossConfig, mb: MicroBatch, num_tokens: int) -> tuple[Tensor, Tensor]:
    """rl: sequence-level policy gradient, plus `cfg.rl_kl_coef` x KL to the reference when it is scored."""
    assert mb.advantages_B is not None, "method rl needs advantages"
    logp_s, kl = _student_logp_and_kl(cfg, mb, num_tokens)
    y, mask = mb.targets_BC, mb.mask_BC
    logp_y = sampled_token_logprobs(logp_s, y)
    loss = policy_gradient_loss(logp_y, mb.advantages_B, mask, num_tokens)
    if mb.reference_logits_BCV is not None:
        ref_y = sampled_token_logprobs(log_softmax_chunked(mb.reference_logits_BCV, cfg.vocab_chunk, mask), y)
        loss = loss + cfg.rl_kl_coef * token_mean(kl_to_reference(logp_y, ref_y, mask), mask, num_tokens)
    return loss, kl


def accumulate_gradients(
    models: StepModels, batch: Batch, loss: MicroBatchLoss, num_tokens: int | None = None,
    advantages_B: Tensor | None = None,
) -> StepSums:
    """Backward every micro-batch of the step; return its summed loss and reverse KL, and timings.

    Each micro-batch's loss is already divided by the completion tokens of the whole step, so
    the accumulated gradient and the summed loss are those of one big batch. `num_tokens`: the
    step's completion tokens over all processes (default: this batch's). `advantages_B`: one
    per row (method rl), sliced with the rows.
    """
    num_tokens = batch.num_tokens if num_tokens is None else num_tokens
    size, vocab = models.micro_batch, models.vocab_size
    loss_sum = kl_sum = t_score = t_update = 0.0
    for start in range(0, batch.num_rows, size):
        t0 = time.perf_counter()
        rows = batch.rows(start, start + size)
        teacher_logits = rows.frozen_logits(models.teacher, "teacher", vocab)
        reference_logits = rows.frozen_logits(models.reference, "student", vocab) if models.reference is not None else None
        t1 = time.perf_counter()
        student_logits = rows.logits(models.student, "student", vocab)  # the one student forward of these rows
        advantages = advantages_B[start:start + size].to(student_logits.device) if advantages_B is not None else None
        mb = MicroBatch(rows.targets_BC, rows.mask_BC, student_logits, teacher_logits, reference_logits, advantages)
        mb_loss, kl = loss(mb, num_tokens)
        mb_loss.backward()
        loss_sum, kl_sum = loss_sum + float(mb_loss.detach()), kl_sum + float(kl)
        t_score, t_update = t_score + (t1 - t0), t_update + (time.perf_counter() - t1)
    return StepSums(loss_sum, kl_sum, t_score, t_update)
