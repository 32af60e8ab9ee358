"""The built-in tiny VLM pair: loads with Auto classes, teacher beats student, OPD lowers the KL.

Uses the pair from `build_vlm_pair` (copied from the weights shipped in the package into the
cache).
"""

from __future__ import annotations

import pytest
import torch

from opdlab.data.visual_tasks import get_visual_task
from opdlab.distill.losses import log_softmax_chunked, reverse_kl, token_mean
from opdlab.distill.vlm import (
    completion_logits,
    encode_visual_prompts,
    generate_completions,
    roll_out_visual,
    rollout_logits,
    score_visual,
)
from opdlab.models.vlm_zoo import build_vlm_pair, get_vlm_spec, read_metadata
from opdlab.recipes.zoo_train_vlm import vlm_accuracy


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(2)
    paths = build_vlm_pair("shapes-vlm-tiny")
    load = lambda p: (AutoModelForImageTextToText.from_pretrained(p).eval(), AutoProcessor.from_pretrained(p))  # noqa: E731
    return paths, load(paths.student), load(paths.teacher)


def test_pair_loads_with_auto_classes_and_the_teacher_is_stronger(pair):
    paths, (student, s_proc), (teacher, t_proc) = pair
    assert type(student).__name__ == "LlavaForConditionalGeneration"
    assert type(s_proc).__name__ == "LlavaProcessor"
    assert t_proc.tokenizer.get_vocab() == s_proc.tokenizer.get_vocab()
    evals = get_visual_task(paths.task).examples(100, seed=1, split="eval")  # another seed than the build's
    s_acc = vlm_accuracy(student, s_proc, evals)
    t_acc = vlm_accuracy(teacher, t_proc, evals)
    meta = read_metadata(paths.student.parent)
    assert meta["spec"]["name"] == "shapes-vlm-tiny"
    assert 0.3 <= s_acc < t_acc - 0.2, (s_acc, t_acc)
    assert t_acc >= 0.75, t_acc


def _rollout_kl(student, s_proc, teacher, t_proc, examples, seed: int) -> float:
    """Mean per-token reverse KL(student || teacher) on seeded student samples."""
    torch.manual_seed(seed)
    sp, tp = encode_visual_prompts(s_proc, examples), encode_visual_prompts(t_proc, examples)
    ids_BC, mask_BC = generate_completions(student, s_proc, sp, max_new_tokens=14)
    with torch.no_grad():
        s = log_softmax_chunked(completion_logits(student, sp, ids_BC, mask_BC), chunk=1024)
        t = log_softmax_chunked(completion_logits(teacher, tp, ids_BC, mask_BC), chunk=1024)
    return token_mean(reverse_kl(s, t, mask_BC), mask_BC, int(mask_BC.sum())).item()


@pytest.mark.slow
def test_a_few_opd_steps_lower_the_reverse_kl(pair):
    """A standalone OPD loop: student samples, teacher scores through its own processor inputs."""
    paths, (student, s_proc), (teacher, t_proc) = pair
    student = type(student).from_pretrained(paths.student)  # a private copy: the fixture's stays untouched
    held_out = get_visual_task(paths.task).examples(64, seed=2, split="eval")
    before = _rollout_kl(student, s_proc, teacher, t_proc, held_out, seed=0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    train = get_visual_task(paths.task).examples(12 * 16, seed=3, split="train")
    V = student.config.text_config.vocab_size
    torch.manual_seed(0)
    processors = {"student": s_proc, "teacher": t_proc}
    for step in range(12):
        batch = roll_out_visual(student, processors, train[step * 16 : (step + 1) * 16], samples=2, max_new_tokens=14)
        num_tokens = int(batch.completion_mask_BT.sum())
        assert num_tokens == int(batch.mask_BC.sum()) > 0
        for start in (0, 16):  # two micro-batches, normalized by the whole step's tokens
            mb = batch.rows(start, start + 16)
            t_logp = log_softmax_chunked(score_visual(teacher, mb, vocab_size=V), chunk=1024)
            student.train()
            s_logp = log_softmax_chunked(rollout_logits(student, mb, "student", V), chunk=1024)
            token_mean(reverse_kl(s_logp, t_logp, mb.mask_BC), mb.mask_BC, num_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    student.eval()
    after = _rollout_kl(student, s_proc, teacher, t_proc, held_out, seed=0)
    print(f"reverse KL before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before, (before, after)


def test_spec_is_registered():
    spec = get_vlm_spec("shapes-vlm-tiny")
    assert spec.student_min_accuracy < spec.teacher_min_accuracy
