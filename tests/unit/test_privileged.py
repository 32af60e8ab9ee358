"""Method opsd's privileged teacher view: alignment with the student's rollout, fallbacks, errors.

The alignment test is the one the issue demands: the teacher must score exactly the tokens the
student sampled, behind its own (privileged) prompt, so its logits from the padded, sliced
micro-batch must equal those of a plain unpadded forward of [teacher prompt + completion].
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from opdlab.cli import main
from opdlab.config import DistillConfig, load_config
from opdlab.data.tasks import Example
from opdlab.distill.evaluate import evaluate
from opdlab.distill.privileged import (
    check_privileged, privileged_text, teacher_message, teacher_prompt_ids, teacher_view,
)
from opdlab.data.prompts import render_prompts
from opdlab.distill.rollout import completion_logits, roll_out, score, with_prompts
from opdlab.errors import UserError
from opdlab.models.loading import load_teacher, load_tokenizer
from opdlab.models.zoo import save_random_model

# Every character is in the tiny character tokenizer's vocabulary (no <unk> in the teacher prompt).
TEMPLATE = "{prompt} hint: {privileged}"
# Prompt and privileged lengths vary in opposite directions, so the student's and the teacher's
# left padding differ row by row; no privileged text occurs in any prompt.
EXAMPLES = [
    Example(prompt="add:1+2", answer="3", task="addition", privileged="qqqq wxyz vvvv"),
    Example(prompt="sort:hgfedcbahg", answer="abcdefghgh", task="sort", privileged="kk"),
    Example(prompt="rev:abcdefgh", answer="zyx", task="reverse"),  # no privileged field: the answer
    Example(prompt="add:12+345+6789+1", answer="7147", task="addition", privileged="jjjjjjjjjjjjjjjjjjjj"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama folder's teacher-mode model and tokenizer (which has a chat template)."""
    torch.set_num_threads(1)
    folder = save_random_model(tmp_path_factory.mktemp("tiny") / "model", seed=3, hidden_size=32)
    tok = load_tokenizer(folder, "student")
    assert tok.chat_template
    return load_teacher(folder), tok


def chat_ids(tok, text: str) -> list[int]:
    """Reference rendering: the chat template as a string, then plain tokenization (no opdlab code)."""
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def rollout(model, tok, samples: int = 2):
    torch.manual_seed(0)
    prompts = render_prompts(tok, [ex.prompt for ex in EXAMPLES])
    return roll_out(model, tok, prompts, EXAMPLES, samples=samples, max_new_tokens=7)


# ----------------------------------------------------------------------------- alignment


def test_teacher_view_keeps_completions_and_swaps_prompts(tiny):
    model, tok = tiny
    batch = rollout(model, tok)
    view = teacher_view(batch, tok, TEMPLATE)
    B = len(EXAMPLES) * 2
    assert view.input_ids_BT.shape[0] == B
    # The completion part is the student's, token for token, mask for mask.
    assert torch.equal(view.targets_BC, batch.targets_BC)
    assert torch.equal(view.mask_BC, batch.mask_BC)
    assert torch.equal(view.attention_mask_BT[:, view.prompt_len:], batch.attention_mask_BT[:, batch.prompt_len:])
    assert not view.completion_mask_BT[:, :view.prompt_len].any()  # no prompt column is a target
    assert view.completions == batch.completions and view.examples == batch.examples
    for i in range(B):
        ex = batch.examples[i]
        secret = privileged_text(ex)
        t_attn, s_attn = view.attention_mask_BT[i, :view.prompt_len], batch.attention_mask_BT[i, :batch.prompt_len]
        teacher_text = tok.decode(view.input_ids_BT[i, :view.prompt_len][t_attn.bool()])
        student_text = tok.decode(batch.input_ids_BT[i, :batch.prompt_len][s_attn.bool()])
        assert ex.prompt in teacher_text and f"hint: {secret}" in teacher_text
        assert ex.prompt in student_text and secret not in student_text and "hint" not in student_text
        # Left padding: every real teacher prompt token sits at the right end of the prompt block.
        assert view.input_ids_BT[i, :view.prompt_len][t_attn.bool()].tolist() == \
            chat_ids(tok, f"{ex.prompt} hint: {secret}")
        assert bool(t_attn[-1]) and torch.all(t_attn[:-1] <= t_attn[1:])
    # The fallback row (no privileged field) reads its answer.
    assert "hint: zyx" in tok.decode(view.input_ids_BT[4, :view.prompt_len])


@pytest.mark.parametrize("start, stop", [(0, 8), (0, 3), (1, 5), (2, 4), (6, 8), (7, 8)])
def test_teacher_logits_of_a_micro_batch_match_an_unpadded_forward(tiny, start, stop):
    """score(teacher, view.rows(a, b)) == logits of one unpadded [teacher prompt + completion] sequence."""
    model, tok = tiny
    batch = rollout(model, tok)
    view = teacher_view(batch, tok, TEMPLATE)
    V = model.config.vocab_size
    t_logits = score(model, view.rows(start, stop), V)
    s_logits = completion_logits(model, batch.rows(start, stop), V)
    assert t_logits.shape == s_logits.shape  # teacher and student logits pair position by position
    assert torch.equal(view.rows(start, stop).mask_BC, batch.rows(start, stop).mask_BC)
    differs = False
    for r, i in enumerate(range(start, stop)):
        ex = batch.examples[i]
        # Independent reference: the chat template applied here, not through opdlab's renderer.
        prompt = chat_ids(tok, f"{ex.prompt} hint: {privileged_text(ex)}")
        keep = batch.mask_BC[i].bool()
        completion = batch.targets_BC[i][keep].tolist()
        n = len(completion)
        assert n >= 1
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([list(prompt) + completion])).logits[0].float()
        ref = ref[len(prompt) - 1: len(prompt) - 1 + n, :V]  # logits that predict each completion token
        torch.testing.assert_close(t_logits[r, :n], ref, atol=2e-5, rtol=1e-4)
        differs |= not torch.allclose(s_logits[r, :n], ref, atol=1e-3)
    assert differs  # the privileged prompt changes the teacher's prediction somewhere


def test_the_test_batch_has_ragged_prompts(tiny):
    """The alignment tests above cover rows whose student and teacher prompt lengths differ, in
    different orders (so the two left paddings differ row by row)."""
    model, tok = tiny
    batch = rollout(model, tok)
    view = teacher_view(batch, tok, TEMPLATE)
    student = batch.attention_mask_BT[::2, :batch.prompt_len].sum(dim=1).tolist()
    teacher = view.attention_mask_BT[::2, :view.prompt_len].sum(dim=1).tolist()
    assert len(set(student)) == len(EXAMPLES) and len(set(teacher)) == len(EXAMPLES)
    assert sorted(range(4), key=student.__getitem__) != sorted(range(4), key=teacher.__getitem__)


def test_with_prompts_needs_one_prompt_per_row(tiny):
    model, tok = tiny
    batch = rollout(model, tok, samples=1)
    with pytest.raises(ValueError, match="3 prompts for 4 rows"):
        with_prompts(batch, [[1, 2]] * 3, tok.pad_token_id)


def test_ragged_completions_align(tiny):
    """Rows that stopped early (EOS): the view copies the shortened masks; logits still match the reference."""
    model, tok = tiny
    batch = rollout(model, tok)
    P = batch.prompt_len
    eos = tok.eos_token_id
    # Plant an EOS at different completion positions (as if the student had stopped there).
    for i, stop in [(0, 0), (3, 2), (5, 4)]:
        batch.input_ids_BT[i, P + stop] = eos
        batch.input_ids_BT[i, P + stop + 1:] = tok.pad_token_id
        batch.attention_mask_BT[i, P + stop + 1:] = 0
        batch.completion_mask_BT[i, P + stop + 1:] = 0
    view = teacher_view(batch, tok, TEMPLATE)
    assert view.mask_BC.sum(dim=1).tolist()[:6] == [1, 7, 7, 3, 7, 5]
    t_logits = score(model, view.rows(0, 6), model.config.vocab_size)
    for i in (0, 3, 5):
        ex = batch.examples[i]
        prompt = teacher_prompt_ids(tok, [ex], TEMPLATE)[0]
        completion = batch.targets_BC[i][batch.mask_BC[i].bool()].tolist()
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([prompt + completion])).logits[0]
        torch.testing.assert_close(t_logits[i, :len(completion)], ref[len(prompt) - 1:-1], atol=2e-5, rtol=1e-4)


def test_evaluate_scores_behind_the_privileged_prompts_in_every_batch(tiny):
    """evaluate(teacher_prompt_ids=...): KL 0 when the teacher prompts equal the student's, > 0 when
    privileged; the same value whatever the eval batch size (each batch takes its own slice)."""
    model, tok = tiny
    student_prompts = render_prompts(tok, [ex.prompt for ex in EXAMPLES])
    privileged = teacher_prompt_ids(tok, EXAMPLES, TEMPLATE)
    kwargs = dict(max_new_tokens=5, vocab_size=model.config.vocab_size, chunk=64)
    same = evaluate(model, model, tok, EXAMPLES, student_prompts, batch_size=4,
                    teacher_prompt_ids=student_prompts, **kwargs)
    assert same["eval/reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    whole = evaluate(model, model, tok, EXAMPLES, student_prompts, batch_size=4, teacher_prompt_ids=privileged, **kwargs)
    sliced = evaluate(model, model, tok, EXAMPLES, student_prompts, batch_size=3, teacher_prompt_ids=privileged, **kwargs)
    assert whole["eval/reverse_kl"] > 1e-4
    assert sliced["eval/reverse_kl"] == pytest.approx(whole["eval/reverse_kl"], rel=1e-4)
    # A wrong pairing (teacher prompts shifted by one) must give a different number.
    shifted = evaluate(model, model, tok, EXAMPLES, student_prompts, batch_size=4,
                       teacher_prompt_ids=privileged[1:] + privileged[:1], **kwargs)
    assert shifted["eval/reverse_kl"] != pytest.approx(whole["eval/reverse_kl"], rel=1e-3)


# ----------------------------------------------------------------------------- privileged text


def test_privileged_field_wins_then_the_answer():
    assert privileged_text(Example("p", answer="7", task="", privileged="worked: 3+4")) == "worked: 3+4"
    assert privileged_text(Example("p", answer="7", task="")) == "7"
    assert privileged_text(Example("p", answer="7", task="", privileged="")) == "7"  # empty is absent
    assert privileged_text(Example("p", answer="", task="")) is None
    assert privileged_text(SimpleNamespace(prompt="p")) is None  # no such attributes at all
    assert teacher_message(Example("what?", "7", ""), "{prompt} | {privileged}") == "what? | 7"
    assert teacher_message(Example("what?", "7", "", privileged="p"), "[{privileged}] {{x}} {prompt}") == "[p] {x} what?"


def test_a_record_without_privileged_text_is_one_line():
    with pytest.raises(UserError) as info:
        teacher_message(Example("line one\nline two", answer="", task=""), TEMPLATE)
    message = str(info.value)
    assert "\n" not in message and "line one" in message and "privileged" in message


def test_check_privileged_counts_the_records_missing_it():
    examples = [Example(f"p{i}", answer="" if i % 3 == 0 else "a", task="") for i in range(7)]  # 0, 3, 6
    with pytest.raises(UserError) as info:
        check_privileged(examples, "data/p.jsonl", "hint")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data/p.jsonl: ")
    assert "3 of 7 records" in message and "'hint'" in message
    check_privileged(examples[1:3], "x", "hint")  # all have answers: no error
    check_privileged([Example("p", "", "", privileged="h")], "x", "hint")


# ----------------------------------------------------------------------------- template validation


@pytest.mark.parametrize("template", [
    "{prompt} only",
    "{privileged} only",
    "{prompt} {privileged} {foo}",
    "{prompt} {privileged} {",
    "{prompt} {privileged} }",
    "{prompt} {privileged} {0}",
    "{prompt!x} {privileged}",
    "",
])
def test_bad_template_is_a_one_line_config_error(template):
    with pytest.raises(UserError) as info:
        load_config(DistillConfig, None, {"data.privileged_template": template})
    assert "data.privileged_template" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("template", ["{prompt}{privileged}", "{{note}} {privileged}\n{prompt}", TEMPLATE])
def test_good_templates_load(template):
    assert load_config(DistillConfig, None, {"data.privileged_template": template}).data.privileged_template == template


def test_bad_template_on_the_command_line_exits_2(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text('method: opsd\ndata:\n  privileged_template: "{prompt} and {answer}"\n')
    assert main(["distill", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.privileged_template" in err
    assert main(["distill", "--method", "opsd", "--set", 'data.privileged_template="{prompt"',
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.privileged_template" in err
    assert not (tmp_path / "run").exists()


def test_sft_privileged_teacher_writes_behind_its_prompt_and_the_student_reads_behind_its_own(tiny):
    """data.privileged_teacher with sft: the writer sees the privileged prompts; the returned batch has the
    student's plain prompts in front of exactly those completion tokens, and the teacher's view is the written one."""
    from opdlab.config import RolloutConfig
    from opdlab.distill.train import privileged_teacher, roll_out_sft_privileged

    model, tok = tiny
    assert privileged_teacher(load_config(DistillConfig, None, {"method": "sft", "data.privileged_teacher": True}))
    assert not privileged_teacher(load_config(DistillConfig, None, {"method": "sft"}))
    r = RolloutConfig(samples_per_prompt=2, max_new_tokens=3)
    seen = {}

    def sample(writer, tokenizer, prompt_ids, examples, **kwargs):
        seen["prompts"] = prompt_ids
        return roll_out(writer, tokenizer, prompt_ids, examples, **kwargs)

    examples = EXAMPLES[:2]
    batch = roll_out_sft_privileged(r, tok, tok, model, sample, TEMPLATE, examples, [1, 2, 3, 4])
    assert seen["prompts"] == teacher_prompt_ids(tok, examples, TEMPLATE)
    plain = render_prompts(tok, [ex.prompt for ex in batch.examples])
    for i, ids in enumerate(plain):
        row = batch.input_ids_BT[i, :batch.prompt_len][batch.attention_mask_BT[i, :batch.prompt_len].bool()]
        assert row.tolist() == list(ids)
    reference = roll_out(model, tok, teacher_prompt_ids(tok, examples, TEMPLATE), examples, samples=2,
                         max_new_tokens=3, temperature=1.0, top_p=1.0, seeds=[1, 2, 3, 4])
    assert torch.equal(batch.targets_BC, reference.targets_BC) and batch.completions == reference.completions
    assert torch.equal(batch.teacher_view.input_ids_BT, reference.input_ids_BT)
