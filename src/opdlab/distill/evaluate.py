"""Held-out evaluation: greedy task accuracy and the teacher-student reverse KL per token.

    row = evaluate(student, teacher, tok, examples, prompt_ids, max_new_tokens=16, batch_size=64,
                   vocab_size=V, chunk=4096)
    row  # {"eval/accuracy": 0.42, "eval/reverse_kl": 0.18, "eval/reverse_kl_se": 0.01,
         #  "eval/answer_logp": -2.3, "eval/answer_logp_se": 0.2, "eval/num_examples": 128,
         #  "eval/examples": {"reverse_kl_sum": [...], "reverse_kl_tokens": [...], "correct": [...], ...}}

The student answers each held-out prompt greedily (the deterministic "what has it learned"
view); the reverse KL KL(p_student || p_teacher), summed over the vocabulary, is averaged over
the completion tokens of those greedy answers. Two continuous metrics come with their standard
errors over prompts, for when accuracy on a few hundred questions is too coarse to show a
change: the reverse KL (`reverse_kl_se`, the ratio estimator's delta-method error with prompts
as clusters) and, for text prompts with answers, the student's log-likelihood of the reference
answer right after the prompt (`answer_logp`, summed over the answer's tokens, averaged over
prompts; the answer's tokens run behind the greedy decoder's prompt cache). Accuracy is skipped when the prompts carry no
answers (a user prompts file without an answer field). `eval/examples` holds the per-prompt values
behind the means (the run log writes them to `evals/step-N.json`): runs evaluated on the same
prompts are then compared prompt by prompt, with a paired standard error. Evaluation draws no random numbers,
and runs inside `torch.random.fork_rng` anyway, so the training stream is the same whatever
the evaluation schedule: a resumed run stays bit-identical.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from opdlab.data.tasks import get_task
from opdlab.data.visual_tasks import get_visual_task, visual_task_names
from opdlab.distill.logging import EXAMPLES_KEY
from opdlab.distill.losses import log_softmax_chunked, reverse_kl
from opdlab.distill.rollout import Rollout, left_pad, roll_out, with_prompts
from opdlab.distill.vlm import VisualRollout, roll_out_visual




def has_answers(examples: Sequence[Any]) -> bool:
    """True when every example carries a reference answer to check completions against."""
    return bool(examples) and all(getattr(ex, "answer", None) not in (None, "") for ex in examples)


def is_correct(completion: str, example: Any) -> bool:
    """The example's task checker; exact match (whitespace stripped) for records without a task."""
    if example.task in visual_task_names():
        return bool(get_visual_task(example.task).is_correct(completion, example))
    if example.task:
        return bool(get_task(example.task).is_correct(completion, example))
    return completion.strip() == example.answer.strip()


def rollout_correct(completions: Sequence[str], examples: Sequence[Any]) -> torch.Tensor:
    """1.0 where the completion is correct for its example, else 0.0: -> [N]."""
    return torch.tensor([float(is_correct(c, ex)) for c, ex in zip(completions, examples)])


def ratio_se(sums: Sequence[float], counts: Sequence[float]) -> float | None:
    """Standard error of sum(sums)/sum(counts) with rows as independent clusters (delta method).

    For a per-token mean over prompts with different completion lengths; with equal counts it is
    the usual standard error of the per-prompt means. None for fewer than two rows or no tokens.
    """
    m, total = len(sums), float(sum(counts))
    if m < 2 or total <= 0:
        return None
    ratio, mean_count = float(sum(sums)) / total, total / m
    resid = sum((s - ratio * c) ** 2 for s, c in zip(sums, counts))
    return (resid / (m * (m - 1))) ** 0.5 / mean_count


def mean_se(values: Sequence[float]) -> float | None:
    """Standard error of the mean of `values` (None for fewer than two)."""
    return ratio_se(values, [1.0] * len(values))


@torch.no_grad()
def mean_reverse_kl(
    student: Any, teacher: Any, batch: Rollout | VisualRollout, vocab_size: int, chunk: int,
    student_logits_BCV: torch.Tensor | None = None,
) -> tuple[list[float], list[int]]:
    """Per row: (sum over completion tokens of KL(p_s || p_t), number of tokens) on one batch.

    Each model reads the batch as its role does (`batch.logits` / `batch.frozen_logits`): a text batch's
    `teacher_view` (method opsd), a VLM batch's per-model prompt inputs. `student_logits_BCV`: the
    student's logits on the completion columns when the caller has them already (the greedy decoder's,
    `roll_out(logits_out=...)`), instead of a forward pass.
    """
    mask = batch.mask_BC
    if student_logits_BCV is None:
        student_logits_BCV = batch.logits(student, "student", vocab_size)
    logp_s = log_softmax_chunked(student_logits_BCV[..., :vocab_size], chunk, mask)
    logp_t = log_softmax_chunked(batch.frozen_logits(teacher, "teacher", vocab_size), chunk, mask)
    return reverse_kl(logp_s, logp_t, mask).sum(-1).tolist(), mask.sum(-1).tolist()


@torch.no_grad()
def answer_logprobs(
    student: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], examples: Sequence[Any], vocab_size: int,
    chunk: int, prefill: tuple[Any, torch.Tensor] | None = None,
) -> list[float]:
    """log p_student(reference answer | prompt) per example, summed over the answer's tokens.

    The answer text (`str(example.answer)`) is tokenized without special tokens and placed right
    after the rendered prompt, as the first tokens of the student's reply. `prefill`: the greedy
    decoder's prompt cache and its first-step logits [B, V] on exactly these (left-padded) prompts;
    then only the answer tokens but the last run through the model, behind that cache, instead of
    prompt and answer together (the same numbers up to float32 rounding).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers = [tokenizer.encode(str(ex.answer), add_special_tokens=False) or [pad] for ex in examples]
    ids_p, attn_p = left_pad(prompt_ids, pad)
    width = max(len(a) for a in answers)
    ans = torch.full((len(answers), width), pad, dtype=torch.long)
    ans_mask = torch.zeros((len(answers), width), dtype=torch.long)
    for i, a in enumerate(answers):
        ans[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        ans_mask[i, : len(a)] = 1
    device = next(student.parameters()).device
    if prefill is not None:
        return _answer_logprobs_cached(student, prefill, attn_p.to(device), ans.to(device), ans_mask.to(device),
                                       vocab_size, chunk)
    batch = Rollout(torch.cat([ids_p, ans], 1).to(device), torch.cat([attn_p, ans_mask], 1).to(device),
                    torch.cat([torch.zeros_like(attn_p), ans_mask], 1).to(device), ids_p.shape[1], [], list(examples))
    mask = ans_mask.to(device)
    return _summed_logp(batch.logits(student, "student", vocab_size), batch.targets_BC, mask, chunk)


def _summed_logp(logits_BAV: torch.Tensor, targets_BA: torch.Tensor, mask_BA: torch.Tensor, chunk: int) -> list[float]:
    """Per row, the summed log-probability of the masked target tokens under `logits_BAV`."""
    logp = log_softmax_chunked(logits_BAV, chunk, mask_BA)
    token_logp = logp.gather(-1, targets_BA.unsqueeze(-1)).squeeze(-1)
    return (token_logp * mask_BA).sum(-1).tolist()


def _answer_logprobs_cached(student: Any, prefill: tuple[Any, torch.Tensor], attn_BP: torch.Tensor,
                            ans_BA: torch.Tensor, ans_mask_BA: torch.Tensor, vocab_size: int, chunk: int) -> list[float]:
    """`answer_logprobs` behind the decoder's prompt cache: the first answer token from the prefill's logits,
    the others from a forward pass over the answer tokens but the last (positions continue the prompt's)."""
    cache, first_BV = prefill
    logits = first_BV[:, None, :vocab_size]
    width = ans_BA.shape[1]
    if width > 1:
        positions = attn_BP.sum(-1, keepdim=True) + torch.arange(width - 1, device=attn_BP.device)
        rest = student(input_ids=ans_BA[:, :-1], attention_mask=torch.cat([attn_BP, ans_mask_BA[:, :-1]], 1),
                       position_ids=positions, cache=cache, use_cache=True).logits
        logits = torch.cat([logits, rest[..., :vocab_size].float()], dim=1)
    return _summed_logp(logits, ans_BA, ans_mask_BA, chunk)


def evaluate(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    vocab_size: int,
    chunk: int,
    teacher_prompt_ids: Sequence[Sequence[int]] | None = None,
    reuse_decode_logits: bool = True,
) -> dict[str, float]:
    """Greedy accuracy (overall and per task) and per-token reverse KL on held-out prompts.

    `teacher_prompt_ids` (method opsd): the teacher scores each greedy answer behind its own,
    privileged prompt instead of the student's. The student's side of the reverse KL is the
    distribution the greedy decoder chose each token from, and the answer likelihood continues the
    decoder's prompt cache (`reuse_decode_logits`, on the fast decoding path): two student passes over
    the prompts fewer per batch, the same numbers up to float32 rounding (tests/unit/test_eval_metrics.py).
    Without the fast path, or with `reuse_decode_logits=False`, the student runs both passes.
    """
    answers = has_answers(examples)
    decoded: dict[int, torch.Tensor] = {}  # batch start -> the decoder's logits [B, C, V]
    prefills: dict[int, tuple[Any, torch.Tensor]] = {}  # batch start -> (prompt cache, first-step logits)

    def roll(a: int, b: int) -> Rollout:
        steps: list[torch.Tensor] = []
        caches: list[Any] = []
        batch = roll_out(student, tokenizer, prompt_ids[a:b], examples[a:b], samples=1,
                         max_new_tokens=max_new_tokens, greedy=True,
                         logits_out=steps if reuse_decode_logits else None,
                         prefill_out=caches if reuse_decode_logits and answers else None)
        if steps and len(steps) == batch.targets_BC.shape[1]:
            decoded[a] = torch.stack(steps, dim=1)
        if steps and caches:
            prefills[a] = (caches[0], steps[0])
        return batch

    def kl(batch: Rollout, a: int) -> tuple[list[float], list[int]]:
        if teacher_prompt_ids is not None:
            view = with_prompts(batch, teacher_prompt_ids[a:a + batch_size], tokenizer.pad_token_id)
            batch = replace(batch, teacher_view=view)
        return mean_reverse_kl(student, teacher, batch, vocab_size, chunk, decoded.pop(a, None))

    def answer(a: int, b: int) -> list[float]:
        return answer_logprobs(student, tokenizer, prompt_ids[a:b], examples[a:b], vocab_size, chunk,
                               prefills.pop(a, None))

    return _greedy_eval(student, examples, batch_size, roll, kl, answer if answers else None)


def _greedy_eval(
    student: Any,
    examples: Sequence[Any],
    batch_size: int,
    roll: Callable[[int, int], Any],
    kl: Callable[[Any, int], tuple[list[float], list[int]]],
    answer: Callable[[int, int], list[float]] | None = None,
) -> dict[str, float]:
    """The evaluation loop both model kinds share: greedy batches of `examples[a:b]` from `roll`,
    per-row reverse KL sums and token counts from `kl(batch, a)`, the answer log-likelihoods from
    `answer(a, b)` when given; in eval mode and without touching the training RNG."""
    with torch.random.fork_rng(devices=[]):
        was_training = student.training
        student.eval()
        try:
            completions: list[str] = []
            kl_sums: list[float] = []
            kl_tokens: list[int] = []
            answer_logp: list[float] = []
            for start in range(0, len(examples), batch_size):
                batch = roll(start, start + batch_size)
                completions.extend(batch.completions)
                s, n = kl(batch, start)
                kl_sums += s
                kl_tokens += n
                if answer is not None:
                    answer_logp += answer(start, start + batch_size)
        finally:
            student.train(was_training)
    row: dict[str, Any] = accuracy_row(completions, examples, sum(kl_sums) / max(sum(kl_tokens), 1))
    row["eval/num_examples"] = len(examples)
    # per held-out prompt, in order, so that two runs evaluated on the same prompts can be compared
    # pairwise (report/verdicts.paired_se); the log writes it to evals/step-N.json, not metrics.jsonl
    per_example: dict[str, list[float]] = {"reverse_kl_sum": kl_sums, "reverse_kl_tokens": [float(n) for n in kl_tokens]}
    if has_answers(examples):
        per_example["correct"] = rollout_correct(completions, examples).tolist()
    if answer_logp:
        per_example["answer_logp"] = answer_logp
    row[EXAMPLES_KEY] = per_example
    se = ratio_se(kl_sums, kl_tokens)
    if se is not None:
        row["eval/reverse_kl_se"] = se
    if answer_logp:
        row["eval/answer_logp"] = sum(answer_logp) / len(answer_logp)
        se = mean_se(answer_logp)
        if se is not None:
            row["eval/answer_logp_se"] = se
    return row


def evaluate_visual(
    student: Any,
    teacher: Any,
    processors: dict[str, Any],
    examples: Sequence[Any],
    *,
    max_new_tokens: int,
    batch_size: int,
    vocab_size: int,
    chunk: int,
) -> dict[str, float]:
    """`evaluate` for VLM pairs: greedy visual answers, accuracy and reverse KL, same keys.

    `processors` maps "student" and "teacher" to each model's own processor (docs/vlm.md).
    """
    return _greedy_eval(
        student, examples, batch_size,
        lambda a, b: roll_out_visual(student, processors, examples[a:b], samples=1,
                                     max_new_tokens=max_new_tokens, greedy=True),
        lambda batch, _: mean_reverse_kl(student, teacher, batch, vocab_size, chunk),
    )


def accuracy_row(completions: Sequence[str], examples: Sequence[Any], reverse_kl_per_token: float) -> dict[str, float]:
    """The evaluation row: reverse KL, and accuracy (overall and per task) when examples carry answers."""
    row: dict[str, float] = {"eval/reverse_kl": reverse_kl_per_token}
    if has_answers(examples):
        correct = rollout_correct(completions, examples)
        row["eval/accuracy"] = float(correct.mean())
        by_task: dict[str, list[float]] = defaultdict(list)
        for ok, ex in zip(correct.tolist(), examples):
            by_task[ex.task or "exact"].append(ok)
        if len(by_task) > 1:
            for task, oks in sorted(by_task.items()):
                row[f"eval/accuracy/{task}"] = sum(oks) / len(oks)
    return row
