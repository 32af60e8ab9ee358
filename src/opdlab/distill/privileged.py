"""On-policy self-distillation (method `opsd`): the teacher's privileged view of a rollout.

The teacher is the student's own frozen source model. It reads a different user message,
the prompt plus privileged context (a worked solution, the answer) through
`data.privileged_template`, and scores exactly the tokens the student sampled after the
plain prompt:

    student reads   <chat>{prompt}<gen>            c_1 c_2 ... c_C
    teacher reads   <chat>{prompt} Hint: 42.<gen>  c_1 c_2 ... c_C

Both are rendered through the chat template; only the prompt columns differ, so the
teacher's logits line up with the student's position by position (`with_prompts`).

    view = teacher_view(batch, tokenizer, cfg.data.privileged_template)
    t_logits = score(teacher, view.rows(a, b), vocab)   # pairs with completion_logits(student, batch.rows(a, b))
"""

from __future__ import annotations

from typing import Any, Sequence

from opdlab.data.prompts import render_prompts
from opdlab.distill.rollout import Rollout, with_prompts
from opdlab.errors import UserError


def privileged_text(example: Any) -> str | None:
    """The context only the teacher sees: the record's privileged field, else its answer."""
    for text in (getattr(example, "privileged", None), getattr(example, "answer", None)):
        if text not in (None, ""):
            return str(text)
    return None


def teacher_message(example: Any, template: str) -> str:
    """The teacher's user message: `template` filled with the prompt and the privileged text."""
    text = privileged_text(example)
    if text is None:
        raise UserError(f"method opsd: prompt {example.prompt[:40]!r} has no privileged text; give every record "
                        "the privileged field (data.privileged_field) or an answer")
    return template.format(prompt=example.prompt, privileged=text)


def check_privileged(examples: Sequence[Any], where: str, field: str) -> None:
    """Fail before step 1 when a record has neither privileged text nor an answer."""
    missing = sum(privileged_text(ex) is None for ex in examples)
    if missing:
        raise UserError(f"{where}: method opsd needs privileged context for the teacher, but {missing} of "
                        f"{len(examples)} records have neither a '{field}' field nor an answer")


def teacher_prompt_ids(tokenizer: Any, examples: Sequence[Any], template: str) -> list[list[int]]:
    """Chat-template token ids of each example's privileged teacher message."""
    return render_prompts(tokenizer, [teacher_message(ex, template) for ex in examples])


def teacher_view(batch: Rollout, tokenizer: Any, template: str) -> Rollout:
    """`batch` with each row's prompt replaced by its privileged teacher prompt."""
    return with_prompts(batch, teacher_prompt_ids(tokenizer, batch.examples, template), tokenizer.pad_token_id)
