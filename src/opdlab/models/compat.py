"""Pre-flight checks that a teacher can score a student's tokens, run before training step 1.

The teacher scores exactly the token ids the student produced, so every student token
must mean the same thing to the teacher. A mismatch here would otherwise show up as a shape
crash deep in the loss or, worse, as a silently wrong training signal (a different chat
template biases every teacher log-probability). Each failure is one `UserError` line saying
what differs and what to do.

    check_tokenizers(student_tok, teacher_tok, student.config.vocab_size, teacher.config.vocab_size,
                     "runs/student", "Qwen/Qwen2.5-7B-Instruct")
"""

from __future__ import annotations

from typing import Any

from opdlab.errors import UserError

# A conversation with every common role transition, rendered by both chat templates.
PROBE_CONVERSATION = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And 7 * 6?"},
]
_SAME_TOKENIZER = "use a teacher and student that share one tokenizer (same model family)"


def check_tokenizers(
    student_tok: Any,
    teacher_tok: Any,
    student_vocab_size: int,
    teacher_vocab_size: int,
    student_name: str,
    teacher_name: str,
) -> None:
    """Raise a UserError unless the teacher can score every student token id.

    `*_vocab_size` are the models' vocabulary rows (`config.vocab_size`). The teacher may have
    more rows (padding, as Qwen2.5-7B's 152064 vs 151936) and extra tokens above the student's;
    every student token must have the same id in the teacher, bos/eos/pad must agree, and
    both chat templates must render a probe conversation to the same text and token ids.
    """
    s, t = f"student ({student_name})", f"teacher ({teacher_name})"
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()

    largest_id = max(student_vocab.values(), default=-1)
    if largest_id >= student_vocab_size:
        raise UserError(
            f"{s}: tokenizer has ids up to {largest_id} but the model has only {student_vocab_size} "
            "vocabulary rows; load the tokenizer that belongs to this model"
        )
    if teacher_vocab_size < student_vocab_size:
        raise UserError(
            f"{t} has {teacher_vocab_size} vocabulary rows, fewer than the {s}'s {student_vocab_size}; "
            f"the teacher must cover every student row — {_SAME_TOKENIZER}"
        )
    for token, student_id in sorted(student_vocab.items(), key=lambda item: item[1]):
        teacher_id = teacher_vocab.get(token)
        if teacher_id != student_id:
            where = "is missing" if teacher_id is None else f"is id {teacher_id}"
            raise UserError(
                f"tokenizers differ: token {token!r} is id {student_id} in the {s} but {where} in the {t}; "
                f"{_SAME_TOKENIZER}"
            )

    for role in ("bos", "eos", "pad"):
        s_token, t_token = getattr(student_tok, f"{role}_token", None), getattr(teacher_tok, f"{role}_token", None)
        if s_token != t_token:
            raise UserError(
                f"{role} token differs: {s} uses {s_token!r}, {t} uses {t_token!r}; set the teacher "
                f"tokenizer's {role}_token to {s_token!r} (tokenizer_config.json) or {_SAME_TOKENIZER}"
            )

    _check_chat_templates(student_tok, teacher_tok, s, t)


def _check_chat_templates(student_tok: Any, teacher_tok: Any, s: str, t: str) -> None:
    s_template, t_template = getattr(student_tok, "chat_template", None), getattr(teacher_tok, "chat_template", None)
    if not s_template and not t_template:
        return  # both base models: prompts are plain text for both
    if not s_template or not t_template:
        missing, present = (s, t) if not s_template else (t, s)
        raise UserError(
            f"chat template: the {missing} has none but the {present} has one; copy the chat_template "
            "into the other tokenizer's tokenizer_config.json so both render prompts the same way"
        )
    s_text = _render_probe(student_tok, s)
    t_text = _render_probe(teacher_tok, t)
    if s_text != t_text:
        at = next((i for i, (a, b) in enumerate(zip(s_text, t_text)) if a != b), min(len(s_text), len(t_text)))
        raise UserError(
            f"chat templates differ: a probe conversation renders differently from character {at} "
            f"({s}: {s_text[at:at + 30]!r}, {t}: {t_text[at:at + 30]!r}); the teacher would score prompts "
            "it was not trained on — give both tokenizers the same chat_template"
        )
    s_ids = student_tok(s_text, add_special_tokens=False)["input_ids"]
    t_ids = teacher_tok(t_text, add_special_tokens=False)["input_ids"]
    if list(s_ids) != list(t_ids):
        at = next((i for i, (a, b) in enumerate(zip(s_ids, t_ids)) if a != b), min(len(s_ids), len(t_ids)))
        raise UserError(
            f"tokenizers split the same text differently: the probe conversation's token {at} is "
            f"{list(s_ids[at:at + 3])} in the {s} but {list(t_ids[at:at + 3])} in the {t}; {_SAME_TOKENIZER}"
        )


def _render_probe(tok: Any, who: str) -> str:
    try:
        return tok.apply_chat_template(PROBE_CONVERSATION, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template may reject roles or raise from Jinja
        raise UserError(
            f"chat template of the {who} cannot render a user/assistant/user conversation "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix its chat_template"
        ) from None
