"""The continuous held-out metrics and their standard errors (distill/evaluate.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from opdlab.data.prompts import render_prompts
from opdlab.data.tasks import Example
from opdlab.distill.evaluate import answer_logprobs, evaluate, mean_se, ratio_se
from opdlab.models.loading import load_teacher, load_tokenizer
from opdlab.models.zoo import save_random_model

EXAMPLES = [Example(prompt="add:1+2", answer="3", task="addition"),
            Example(prompt="sort:hgfe", answer="efgh", task="sort"),
            Example(prompt="add:12+34", answer="46", task="addition")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    folder = save_random_model(tmp_path_factory.mktemp("tiny") / "model", seed=5, hidden_size=32)
    return load_teacher(folder), load_tokenizer(folder, "student")


def test_mean_se_is_the_textbook_standard_error():
    values = [1.0, 2.0, 4.0, 7.0]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert mean_se(values) == pytest.approx(sd / 2)
    assert mean_se([3.0]) is None


def test_ratio_se_equals_per_row_se_for_equal_counts_and_matches_a_simulation():
    sums, counts = [2.0, 4.0, 9.0], [2, 2, 2]
    assert ratio_se(sums, counts) == pytest.approx(mean_se([1.0, 2.0, 4.5]))
    # unequal lengths: the delta-method error agrees with the spread of the estimator over many draws
    rng = random.Random(0)
    def draw():
        rows = [(rng.randint(1, 12)) for _ in range(200)]
        return [sum(rng.expovariate(2.0) for _ in range(n)) for n in rows], rows
    estimates, errors = [], []
    for _ in range(300):
        s, c = draw()
        estimates.append(sum(s) / sum(c))
        errors.append(ratio_se(s, c))
    spread = mean_se(estimates) * math.sqrt(len(estimates))   # sd of the estimator
    assert sum(errors) / len(errors) == pytest.approx(spread, rel=0.15)
    assert ratio_se([1.0], [3]) is None and ratio_se([0.0, 0.0], [0, 0]) is None


def test_answer_logprobs_match_a_forward_pass_per_example(tiny):
    model, tok = tiny
    prompts = render_prompts(tok, [ex.prompt for ex in EXAMPLES])
    got = answer_logprobs(model, tok, prompts, EXAMPLES, model.config.vocab_size, chunk=16)
    for i, ex in enumerate(EXAMPLES):
        answer = tok.encode(ex.answer, add_special_tokens=False)
        ids = torch.tensor([list(prompts[i]) + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        ref = sum(float(logp[len(prompts[i]) - 1 + j, t]) for j, t in enumerate(answer))
        assert got[i] == pytest.approx(ref, abs=1e-4)


def test_evaluate_reports_the_continuous_metrics_with_errors_whatever_the_batch_size(tiny):
    model, tok = tiny
    prompts = render_prompts(tok, [ex.prompt for ex in EXAMPLES])
    kwargs = dict(max_new_tokens=4, vocab_size=model.config.vocab_size, chunk=64)
    whole = evaluate(model, model, tok, EXAMPLES, prompts, batch_size=3, **kwargs)
    split = evaluate(model, model, tok, EXAMPLES, prompts, batch_size=2, **kwargs)
    assert whole["eval/num_examples"] == 3
    ref = answer_logprobs(model, tok, prompts, EXAMPLES, model.config.vocab_size, chunk=16)
    assert whole["eval/answer_logp"] == pytest.approx(sum(ref) / 3, abs=1e-4)
    assert whole["eval/answer_logp_se"] == pytest.approx(mean_se(ref), abs=1e-4)
    assert whole["eval/answer_logp"] < 0 and whole["eval/answer_logp_se"] > 0
    for key in ("eval/answer_logp", "eval/answer_logp_se", "eval/reverse_kl", "eval/reverse_kl_se"):
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7)
    # no answers -> no accuracy and no answer likelihood
    bare = [Example(prompt=ex.prompt, answer="", task="") for ex in EXAMPLES]
    row = evaluate(model, model, tok, bare, prompts, batch_size=3, **kwargs)
    assert "eval/answer_logp" not in row and "eval/accuracy" not in row and "eval/reverse_kl" in row


def test_the_decoder_supplies_the_students_kl_side_and_answer_prefix_with_forward_pass_numbers(tiny, tmp_path, monkeypatch):
    import opdlab.distill.rollout as rollout

    model, tok = tiny
    teacher = load_teacher(save_random_model(tmp_path / "teacher", seed=6, hidden_size=32))
    prompts = render_prompts(tok, [ex.prompt for ex in EXAMPLES])
    kwargs = dict(max_new_tokens=5, vocab_size=model.config.vocab_size, chunk=64, batch_size=2)
    student_passes = []
    real = rollout.completion_logits

    def counted(m, batch, vocab_size=None, share_prompts=True):
        student_passes.append(m is model)
        return real(m, batch, vocab_size, share_prompts)

    monkeypatch.setattr(rollout, "completion_logits", counted)
    reused = evaluate(model, teacher, tok, EXAMPLES, prompts, **kwargs)
    reused_passes, student_passes[:] = sum(student_passes), []
    forward = evaluate(model, teacher, tok, EXAMPLES, prompts, reuse_decode_logits=False, **kwargs)
    # two batches; without reuse, each runs the student over prompt + completion (KL) and prompt + answer
    assert reused_passes == 0 and sum(student_passes) == 4
    assert forward["eval/reverse_kl"] > 1e-3  # two different models: a KL that could be wrong
    assert reused["eval/reverse_kl"] == pytest.approx(forward["eval/reverse_kl"], rel=1e-5)
    assert reused["eval/reverse_kl_se"] == pytest.approx(forward["eval/reverse_kl_se"], rel=1e-4)
    assert reused["eval/answer_logp"] == pytest.approx(forward["eval/answer_logp"], abs=1e-4)
    assert reused["eval/accuracy"] == forward["eval/accuracy"]
    a, b = reused["eval/examples"], forward["eval/examples"]
    assert a["reverse_kl_tokens"] == b["reverse_kl_tokens"]
    assert a["reverse_kl_sum"] == pytest.approx(b["reverse_kl_sum"], rel=1e-5, abs=1e-7)
