"""One step's gradient (`distill/step.py`) against a direct reference, and the batch methods it reads.

The reference is written here without opdlab's loss code: one forward of the whole batch (no
micro-batches), `torch.log_softmax`, and the reverse KL summed over the vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch

from opdlab.config import LossConfig
from opdlab.data.prompts import render_prompts
from opdlab.data.tasks import Example
from opdlab.distill.privileged import teacher_view
from opdlab.distill.rollout import Rollout, completion_logits, roll_out, score
from opdlab.distill.step import StepModels, accumulate_gradients, loss_function
from opdlab.distill.vlm import VisualRollout
from opdlab.models.loading import load_student, load_teacher, load_tokenizer
from opdlab.models.zoo import save_random_model

TEMPLATE = "{prompt} hint: {privileged}"
EXAMPLES = [
    Example(prompt="add:1+2", answer="3", task="addition", privileged="qqqq wxyz"),
    Example(prompt="sort:hgfedcba", answer="abcdefgh", task="sort", privileged="kk"),
    Example(prompt="rev:abcdefgh", answer="hgfedcba", task="reverse"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny random Llamas (student trainable, teacher frozen) sharing the built-in tokenizer."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pair")
    student_dir = save_random_model(root / "student", seed=1, hidden_size=32)
    teacher_dir = save_random_model(root / "teacher", seed=2, hidden_size=32)
    return load_student(student_dir), load_teacher(teacher_dir), load_tokenizer(student_dir, "student")


def privileged_batch(student, tok) -> Rollout:
    torch.manual_seed(0)
    batch = roll_out(student, tok, render_prompts(tok, [ex.prompt for ex in EXAMPLES]), EXAMPLES,
                     samples=2, max_new_tokens=6)
    return replace(batch, teacher_view=teacher_view(batch, tok, TEMPLATE))


def reference_reverse_kl(student, teacher, student_batch: Rollout, teacher_batch: Rollout, V: int) -> torch.Tensor:
    """Mean over completion tokens of sum_v p_s (log p_s - log p_t), from whole-batch forwards."""
    logp_s = torch.log_softmax(completion_logits(student, student_batch, V), dim=-1)
    logp_t = torch.log_softmax(score(teacher, teacher_batch, V), dim=-1)
    per_token = (logp_s.exp() * (logp_s - logp_t)).sum(dim=-1)
    mask = student_batch.mask_BC.float()
    return (per_token * mask).sum() / mask.sum()


def student_grad(student) -> torch.Tensor:
    grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    student.zero_grad(set_to_none=True)
    return grad


def test_micro_batched_opsd_step_equals_one_big_batch_against_the_teachers_view(pair):
    """Uneven micro-batches (4 + 2 rows) give the loss and gradient of one pass over the whole batch,
    and the teacher scores through the batch's privileged view, not the student's prompt."""
    student, teacher, tok = pair
    batch = privileged_batch(student, tok)
    V = student.config.vocab_size
    student.zero_grad(set_to_none=True)
    sums = accumulate_gradients(StepModels(student, teacher, None, V, micro_batch=4), batch,
                                loss_function("opsd", LossConfig()))
    grad = student_grad(student)

    ref = reference_reverse_kl(student, teacher, batch, batch.teacher_view, V)
    ref.backward()
    ref_grad, ref = student_grad(student), float(ref.detach())
    assert sums.loss == pytest.approx(ref, rel=1e-5) and sums.reverse_kl == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        plain = float(reference_reverse_kl(student, teacher, batch, batch, V))  # the teacher reading the plain prompt
    assert abs(plain - ref) > 1e-3 * ref  # 100x the tolerance above: the view changes the teacher's signal


def test_rows_carry_the_teachers_view_and_each_role_reads_its_own(pair):
    student, teacher, tok = pair
    batch = privileged_batch(student, tok)
    V = student.config.vocab_size
    rows = batch.rows(1, 4)
    assert rows.num_rows == 3 and rows.num_tokens == int(batch.completion_mask_BT[1:4].sum())
    assert torch.equal(rows.frozen_logits(teacher, "teacher", V), score(teacher, batch.teacher_view.rows(1, 4), V))
    assert torch.equal(rows.frozen_logits(teacher, "student", V), score(teacher, batch.rows(1, 4), V))
    with torch.no_grad():
        assert torch.equal(rows.logits(student, "student", V), completion_logits(student, batch.rows(1, 4), V))
    plain = replace(batch, teacher_view=None)
    assert plain.view("teacher") is plain  # without a view, the teacher reads the student's batch


def test_text_and_vision_language_batches_offer_the_trainer_the_same_methods():
    for name in ("rows", "logits", "frozen_logits"):
        assert inspect.signature(getattr(Rollout, name)).parameters.keys() == \
            inspect.signature(getattr(VisualRollout, name)).parameters.keys(), name
    for name in ("num_rows", "num_tokens", "targets_BC", "mask_BC", "completion_mask_BT", "completions", "examples"):
        for kind in (Rollout, VisualRollout):
            assert name in kind.__dataclass_fields__ or isinstance(getattr(kind, name, None), property), (kind, name)


def test_loss_function_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        loss_function("ppo", LossConfig())
