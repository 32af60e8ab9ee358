"""The synthetic tasks: exact checkers, disjoint splits, determinism, the mixture."""

from __future__ import annotations

import pytest

from opdlab.data.tasks import Example, accuracy, get_task, split_of, task_names
from opdlab.errors import UserError

FAMILIES = ["addition", "addition3", "sort", "reverse"]


def test_names_and_unknown_task_lists_known_names() -> None:
    assert task_names() == ["addition", "addition3", "sort", "reverse", "mix", "chat-addition", "chat-subtraction"]
    with pytest.raises(UserError, match="known tasks: addition, addition3, sort, reverse, mix, chat-addition"):
        get_task("division")


@pytest.mark.parametrize(
    "task, prompt, answer",
    [
        ("addition", "add:47+86", "331"),  # 133 reversed
        ("addition", "add:90+10", "001"),  # 100 reversed: leading zeros of the reversal matter
        ("addition", "add:10+21", "130"),  # 031 reversed: the sum is padded to 3 digits
        ("addition", "add:00+00", "000"),
        ("addition3", "add:417+086", "3050"),  # 0503 reversed
        ("addition3", "add:999+001", "0001"),
        ("sort", "sort:dbca", "abcd"),
        ("sort", "sort:bab", "abb"),
        ("reverse", "rev:abcde", "edcba"),
    ],
)
def test_checker_accepts_right_and_rejects_wrong(task: str, prompt: str, answer: str) -> None:
    ex = Example(prompt=prompt, answer=answer, task=task)
    t = get_task(task)
    assert t.is_correct(answer, ex)
    assert t.is_correct(f"  {answer}\n", ex)  # surrounding whitespace is ignored
    assert not t.is_correct(answer[:-1], ex)
    assert not t.is_correct(answer + "1", ex)
    assert not t.is_correct(answer[::-1] + "x", ex)
    assert not t.is_correct("", ex)


@pytest.mark.parametrize("name", FAMILIES)
def test_generated_answers_match_an_independent_solver(name: str) -> None:
    for ex in get_task(name).examples(300, seed=1, split="train"):
        op, _, body = ex.prompt.partition(":")
        if name.startswith("addition"):
            a, b = body.split("+")
            width = 2 if name == "addition" else 3
            assert op == "add" and len(a) == len(b) == width and a.isdigit() and b.isdigit()
            assert len(ex.answer) == width + 1 and int(ex.answer[::-1]) == int(a) + int(b)
        elif name == "sort":
            assert op == "sort" and ex.answer == "".join(sorted(body)) and 3 <= len(body) <= 6
        else:
            assert op == "rev" and ex.answer == body[::-1] and 3 <= len(body) <= 6
        assert ex.task == name


@pytest.mark.parametrize("name", FAMILIES + ["mix"])
def test_splits_are_disjoint_and_generation_is_deterministic(name: str) -> None:
    task = get_task(name)
    train = task.examples(10000, seed=0, split="train")
    evals = task.examples(300, seed=0, split="eval")
    assert len(train) == 10000 and len(evals) == 300
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    assert all(split_of(e.prompt) == "eval" for e in evals)
    assert all(split_of(e.prompt) == "train" for e in train)
    assert len({e.prompt for e in evals}) == len(evals)  # no eval prompt counted twice
    assert task.examples(300, seed=0, split="eval") == evals
    assert task.examples(300, seed=1, split="eval") != evals
    # a larger request starts with the same examples (the seed fixes the stream, not the count)
    if name != "mix":
        assert task.examples(400, seed=0, split="eval")[:300] == evals


def test_mix_covers_every_family_roughly_uniformly() -> None:
    exs = get_task("mix").examples(1200, seed=3, split="train")
    counts = {name: sum(e.task == name for e in exs) for name in FAMILIES}
    assert all(220 < c < 380 for c in counts.values()), counts
    mix = get_task("mix")
    assert all(mix.is_correct(e.answer, e) for e in exs)


def test_accuracy_uses_each_examples_own_checker() -> None:
    exs = [
        Example("add:12+05", "710", "addition"),
        Example("sort:cab", "abc", "sort"),
        Example("rev:abc", "cba", "reverse"),
        Example("add:01+01", "200", "addition"),
    ]
    assert accuracy(["710", "abc", "abc", " 3"], exs) == pytest.approx(0.5)
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["1"], exs)


def test_bad_requests_are_user_errors() -> None:
    with pytest.raises(UserError, match="split"):
        get_task("sort").examples(3, seed=0, split="test")  # type: ignore[arg-type]
    with pytest.raises(UserError, match=">= 0"):
        get_task("sort").examples(-1, seed=0, split="train")


def test_addition_train_split_covers_most_two_digit_sums_and_eval_is_a_fifth() -> None:
    """2-digit addition has 10,000 instances; about a fifth are held out, never trained on."""
    n_eval = sum(split_of(f"add:{a:02d}+{b:02d}") == "eval" for a in range(100) for b in range(100))
    assert 1800 < n_eval < 2200
    train = {e.prompt for e in get_task("addition").examples(20000, seed=0, split="train")}
    assert all(split_of(p) == "train" for p in train)
