"""One forward per distinct prompt (rollout.shared_prompt_logits) against the one-pass forward.

Not bit-identical: the attention over the completion columns is blocked differently (the prompt's
keys come from the cache), so sums are rounded in another order. The stated tolerances are float32
rounding of logits of size ~10 summed over a few hundred terms: |logit difference| <= 1e-4, the
student's gradient within 1e-5 relative, the step's loss within 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch

from opdlab.distill.losses import opd_loss
from opdlab.distill.rollout import completion_logits, roll_out, score
from opdlab.distill.sampling import row_seeds

from test_decode import Tok, tiny  # noqa: E402  (tests/unit is on sys.path under pytest's rootdir conftest)


def batch_of(model, samples=4, max_new_tokens=10, prompt_ids=None):
    prompt_ids = prompt_ids or [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    seeds = row_seeds(1, step=1, first_prompt=0, num_prompts=len(prompt_ids), samples=samples)
    return roll_out(model, Tok(), prompt_ids, list(range(len(prompt_ids))), samples=samples,
                    max_new_tokens=max_new_tokens, seeds=seeds)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_logits_match_the_one_pass_forward(kind):
    model = tiny(kind, eos_bias=2.0)
    batch = batch_of(model)
    with torch.no_grad():
        shared = completion_logits(model, batch)
        whole = completion_logits(model, batch, share_prompts=False)
    assert shared.shape == whole.shape == (12, batch.input_ids_BT.shape[1] - batch.prompt_len, 61)
    assert float((shared - whole).abs().max()) <= 1e-4
    assert not torch.equal(score(model, batch, 61), torch.zeros_like(shared))


def test_gradient_and_loss_match_the_one_pass_forward():
    student, teacher = tiny("llama", eos_bias=2.0), tiny("llama", kv_heads=4)
    student.train()
    batch = batch_of(student)
    teacher_logits = score(teacher, batch, 61)
    results = []
    for share in (True, False):
        logits = completion_logits(student, batch, share_prompts=share)
        loss, _ = opd_loss("reverse_kl", logits, teacher_logits, batch.targets_BC, batch.mask_BC, batch.num_tokens,
                           beta=0.5, top_k=8, chunk=4096)
        loss.backward()
        results.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in student.parameters()])))
        student.zero_grad(set_to_none=True)
    (loss_s, grad_s), (loss_w, grad_w) = results
    assert abs(loss_s - loss_w) <= 1e-6 * abs(loss_w)
    assert float((grad_s - grad_w).norm() / grad_w.norm()) <= 1e-5
    assert float(grad_w.norm()) > 0


def test_one_completion_column_and_distinct_prompts():
    model = tiny("llama")
    one = batch_of(model, max_new_tokens=1)  # only the last prompt position's logits
    with torch.no_grad():
        assert float((completion_logits(model, one) - completion_logits(model, one, share_prompts=False)).abs().max()) <= 1e-4
    distinct = batch_of(model, samples=1)  # nothing shared: the one-pass forward itself
    with torch.no_grad():
        assert torch.equal(completion_logits(model, distinct), completion_logits(model, distinct, share_prompts=False))


def test_micro_batches_share_within_themselves():
    """`rows` cuts a batch between samples of one prompt; each part shares what it holds."""
    model = tiny("llama", eos_bias=2.0)
    batch = batch_of(model, samples=4)
    with torch.no_grad():
        whole = completion_logits(model, batch, share_prompts=False)
        for start in (0, 3, 6, 9):
            part = batch.rows(start, start + 3)
            got = completion_logits(model, part)
            width = got.shape[1]
            assert float((got - completion_logits(model, part, share_prompts=False)).abs().max()) <= 1e-4
            mask = part.mask_BC.bool()
            assert float((got[mask] - whole[start:start + 3, :width][mask]).abs().max()) <= 1e-4
