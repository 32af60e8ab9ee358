"""Pre-flight tokenizer checks with small tokenizers built in the test (no downloads)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opdlab.errors import UserError
from opdlab.models.compat import check_tokenizers

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "[user]", "[assistant]", "what", "is", "and", "12", "+", "30", "?", "42", "7", "*", "6"]


def make_tok(
    words: list[str] | None = None,
    eos: str = "</s>",
    template: str | None = TEMPLATE,
    extra: list[str] | None = None,
    split_punctuation: bool = True,
) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate((words or WORDS) + (extra or []))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=eos, pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def check(student: PreTrainedTokenizerFast, teacher: PreTrainedTokenizerFast, s_rows: int = 32, t_rows: int = 32) -> None:
    check_tokenizers(student, teacher, s_rows, t_rows, "tiny-student", "tiny-teacher")


def test_identical_tokenizers_pass() -> None:
    check(make_tok(), make_tok())


def test_teacher_with_padded_rows_and_extra_tokens_passes() -> None:
    check(make_tok(), make_tok(), s_rows=17, t_rows=64)
    check(make_tok(), make_tok(extra=["<tool>", "<image>"]), s_rows=17, t_rows=19)


def test_swapped_token_is_named() -> None:
    swapped = list(WORDS)
    swapped[9], swapped[11] = swapped[11], swapped[9]  # '12' <-> '30'
    with pytest.raises(UserError, match=r"token '12' is id 9 in the student \(tiny-student\) but is id 11 in the teacher"):
        check(make_tok(), make_tok(words=swapped))


def test_token_missing_in_teacher_is_named() -> None:
    with pytest.raises(UserError, match=r"token '<tool>' is id 17 in the student .* is missing in the teacher"):
        check(make_tok(extra=["<tool>"]), make_tok())


def test_different_eos_is_an_error() -> None:
    with pytest.raises(UserError, match=r"eos token differs: student \(tiny-student\) uses '</s>', teacher \(tiny-teacher\) uses '<pad>'"):
        check(make_tok(), make_tok(eos="<pad>"))


def test_different_chat_template_is_an_error() -> None:
    other = TEMPLATE.replace("[{{ m['role'] }}]", "[{{ m['role'] }}] ")
    with pytest.raises(UserError, match=r"chat templates differ: .* character 9"):
        check(make_tok(), make_tok(template=other))
    with pytest.raises(UserError, match=r"the teacher \(tiny-teacher\) has none but the student"):
        check(make_tok(), make_tok(template=None))
    check(make_tok(template=None), make_tok(template=None))  # two base models: nothing to compare


def test_same_vocabulary_but_different_splitting_is_an_error() -> None:
    # 'What is 12 + 30?' -> '30', '?' with punctuation splitting, '30?' (unknown) without.
    with pytest.raises(UserError, match=r"tokenizers split the same text differently"):
        check(make_tok(), make_tok(split_punctuation=False))


def test_broken_chat_template_and_too_few_rows_are_errors() -> None:
    with pytest.raises(UserError, match=r"chat template of the teacher .* cannot render"):
        check(make_tok(), make_tok(template="{{ raise_exception('no assistant role') }}"))
    with pytest.raises(UserError, match=r"teacher \(tiny-teacher\) has 16 vocabulary rows, fewer than"):
        check(make_tok(), make_tok(), s_rows=17, t_rows=16)
    with pytest.raises(UserError, match=r"ids up to 16 but the model has only 10 vocabulary rows"):
        check(make_tok(), make_tok(), s_rows=10, t_rows=64)


def test_the_built_in_tokenizer_passes_against_itself() -> None:
    from opdlab.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    check_tokenizers(tok, build_tokenizer(), 64, 64, "zoo-student", "zoo-teacher")
