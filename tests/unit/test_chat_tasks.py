"""The chat arithmetic tasks for pretrained chat models: prompts, answers, the last-integer checker."""

from __future__ import annotations

import re

import pytest

from opdlab.data.tasks import Example, accuracy, get_task, last_integer, split_of, task_names

CHAT = ["chat-addition", "chat-subtraction"]
PROMPT = re.compile(r"What is (\d+) ([+-]) (\d+)\? Reply with just the number\.")


@pytest.mark.parametrize("text, expected", [
    ("71 - 40 = 31.", "31"),
    ("31", "31"),
    ("  31\n", "31"),
    ("The answer is 1,234", "1234"),
    ("1,234,567 apples", "1234567"),
    ("12 apples and 7 pears", "7"),
    ("It is -5.", "-5"),
    ("10 - 15 = -5", "-5"),
    ("no digits here", None),
    ("", None),
    ("3.5", "5"),  # integers only: the last run of digits
])
def test_last_integer(text, expected):
    assert last_integer(text) == expected


def test_chat_tasks_are_known_but_not_in_the_tiny_mixture():
    assert set(CHAT) <= set(task_names())
    mixed = {ex.task for ex in get_task("mix").examples(400, 0, "train")}
    assert mixed and not mixed & set(CHAT)


@pytest.mark.parametrize("name", CHAT)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_prompts_and_answers_are_right(name, split):
    op = "+" if name == "chat-addition" else "-"
    examples = get_task(name).examples(60, seed=3, split=split)
    assert len(examples) == 60
    for ex in examples:
        match = PROMPT.fullmatch(ex.prompt)
        assert match, ex.prompt
        a, sign, b = int(match[1]), match[2], int(match[3])
        assert sign == op and 10 <= a <= 99 and 10 <= b <= 99
        assert ex.task == name and ex.privileged is None
        assert int(ex.answer) == (a + b if op == "+" else a - b)
        if op == "-":
            assert a >= b and int(ex.answer) >= 0  # larger operand first: no negative answers
        assert split_of(ex.prompt) == split
    if split == "eval":
        assert len({ex.prompt for ex in examples}) == 60  # an eval set never counts a prompt twice


@pytest.mark.parametrize("name", CHAT)
def test_examples_are_deterministic_and_the_splits_disjoint(name):
    task = get_task(name)
    assert task.examples(50, 7, "train") == task.examples(50, 7, "train")
    assert task.examples(50, 7, "eval") == task.examples(50, 7, "eval")
    assert task.examples(50, 7, "train") != task.examples(50, 8, "train")
    train = {ex.prompt for seed in range(3) for ex in task.examples(300, seed, "train")}
    held_out = {ex.prompt for seed in range(3) for ex in task.examples(100, seed, "eval")}
    assert train and held_out and not train & held_out


@pytest.mark.parametrize("completion, ok", [
    ("31", True),
    ("31.", True),
    ("71 - 40 = 31", True),
    ("Sure! 71 minus 40 is 31.", True),
    ("31 is the answer, not 30", False),  # the *last* integer counts
    ("310", False),
    ("3 1", False),
    ("-31", False),
    ("thirty-one", False),
    ("", False),
])
def test_checker_reads_the_last_integer(completion, ok):
    ex = Example(prompt="What is 71 - 40? Reply with just the number.", answer="31", task="chat-subtraction")
    assert get_task("chat-subtraction").is_correct(completion, ex) is ok


def test_accuracy_dispatches_to_the_chat_checker():
    examples = get_task("chat-addition").examples(4, 0, "eval")
    completions = [f"= {ex.answer}" for ex in examples[:3]] + [str(int(examples[3].answer) + 1)]
    assert accuracy(completions, examples) == pytest.approx(0.75)
