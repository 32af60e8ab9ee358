"""Synthetic task families with exact answer checkers: the built-in pairs' prompts and accuracy.

Each family turns a seed into (prompt, answer) examples and checks a completion exactly
(after stripping whitespace). The prompt is the *user message text*; the trainer renders
it through the tokenizer's chat template. A completion is what the model generates after
the generation prompt, EOS stripped.

    task = get_task("addition")
    evals = task.examples(200, seed=0, split="eval")
    evals[0]                     # Example(prompt='add:40+94', answer='431', task='addition')
    accuracy(["431"], evals[:1]) # 1.0  (40 + 94 = 134, reversed)

Families:
  addition  `add:07+86`: A, B uniform in 0..99, zero-padded to 2 digits -> the sum padded to
            3 digits with its digits *reversed* (`390` for 093). Least significant digit first,
            so each output digit depends on one carry, which a ~1 M-parameter model can learn;
            fixed widths put every digit at a fixed position, which a tiny transformer finds far
            faster than variable-length numbers (docs/zoo.md, "Tasks").
  addition3 the same with 3-digit operands and a 4-digit reversed sum (harder).
  sort      `sort:dbca` (3–6 letters a–h, repeats allowed) -> the letters in order, `abcd`.
  reverse   `rev:abcde` (3–6 letters a–h) -> the letters backwards, `edcba`.
  mix       a uniform mixture of the families above (each example keeps its own `task`).
  chat-addition / chat-subtraction
            `What is 71 - 40? Reply with just the number.` -> `31`: two-digit arithmetic in words
            for pretrained chat models; correct when the completion's last integer is the answer.

Train and eval splits are disjoint: a problem instance belongs to `eval` when a stable hash
of its prompt falls in one fifth of the hash range, so no eval prompt is ever trained on.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

from opdlab.errors import UserError

Split = Literal["train", "eval"]

EVAL_FRACTION_DENOMINATOR = 5  # one instance in five (by prompt hash) is held out for eval
LETTERS = "abcdefgh"  # letters used by the list tasks; small so the vocabulary stays small


@dataclass(frozen=True)
class Example:
    """One problem: the user message, its exact answer and the family that checks it.

    `privileged` is optional extra context only a teacher may see (None for the built-in tasks).
    """

    prompt: str
    answer: str
    task: str
    privileged: str | None = None


class Task(Protocol):
    name: str

    def examples(self, n: int, seed: int, split: Split) -> list[Example]: ...

    def is_correct(self, completion: str, example: Example) -> bool: ...


def split_of(prompt: str) -> Split:
    """The split a problem instance belongs to, from a stable hash of its prompt text."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_FRACTION_DENOMINATOR == 0 else "train"


def _check_request(name: str, n: int, split: str) -> None:
    if split not in ("train", "eval"):
        raise UserError(f"task '{name}': split must be 'train' or 'eval', got {split!r}")
    if n < 0:
        raise UserError(f"task '{name}': number of examples must be >= 0, got {n}")


def _sample_split(
    name: str, draw: Callable[[random.Random], tuple[str, str]], n: int, seed: int, split: Split
) -> list[Example]:
    """Draw `n` instances of `split` (deterministic in `seed`).

    Eval instances are distinct within one call, so an eval set never counts a prompt
    twice; train instances are an i.i.d. stream and may repeat (2-digit addition has only
    about 8,000 train instances).
    """
    _check_request(name, n, split)
    # The split is folded into the stream so train and eval draws are independent sequences.
    rng = random.Random(f"{name}:{seed}:{split}")
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise UserError(f"task '{name}': cannot draw {n} distinct {split} examples; ask for fewer")
        prompt, answer = draw(rng)
        if split_of(prompt) != split or (split == "eval" and prompt in seen):
            continue
        seen.add(prompt)
        out.append(Example(prompt=prompt, answer=answer, task=name))
    return out


def _exact(completion: str, example: Example) -> bool:
    return completion.strip() == example.answer.strip()


@dataclass(frozen=True)
class AdditionTask:
    """`add:A+B` -> A+B zero-padded to max_digits+1 digits, reversed; A, B zero-padded to max_digits."""

    name: str = "addition"
    max_digits: int = 2

    def draw(self, rng: random.Random) -> tuple[str, str]:
        a = rng.randrange(10**self.max_digits)
        b = rng.randrange(10**self.max_digits)
        d = self.max_digits
        return f"add:{a:0{d}d}+{b:0{d}d}", f"{a + b:0{d + 1}d}"[::-1]

    def examples(self, n: int, seed: int, split: Split) -> list[Example]:
        return _sample_split(self.name, self.draw, n, seed, split)

    def is_correct(self, completion: str, example: Example) -> bool:
        return _exact(completion, example)


@dataclass(frozen=True)
class ListTask:
    """`{prefix}:letters` -> the letters transformed (sorted or reversed)."""

    name: str
    prefix: str
    transform: Callable[[str], str]
    min_len: int = 3
    max_len: int = 6

    def draw(self, rng: random.Random) -> tuple[str, str]:
        letters = "".join(rng.choice(LETTERS) for _ in range(rng.randint(self.min_len, self.max_len)))
        return f"{self.prefix}:{letters}", self.transform(letters)

    def examples(self, n: int, seed: int, split: Split) -> list[Example]:
        return _sample_split(self.name, self.draw, n, seed, split)

    def is_correct(self, completion: str, example: Example) -> bool:
        return _exact(completion, example)


def _sorted_letters(s: str) -> str:
    return "".join(sorted(s))


def _reversed_letters(s: str) -> str:
    return s[::-1]


FAMILIES: dict[str, Task] = {
    "addition": AdditionTask(),
    "addition3": AdditionTask(name="addition3", max_digits=3),
    "sort": ListTask(name="sort", prefix="sort", transform=_sorted_letters),
    "reverse": ListTask(name="reverse", prefix="rev", transform=_reversed_letters),
}


@dataclass(frozen=True)
class MixTask:
    """A uniform mixture of all families; each example keeps its own family's `task`."""

    name: str = "mix"

    def examples(self, n: int, seed: int, split: Split) -> list[Example]:
        _check_request(self.name, n, split)
        rng = random.Random(f"mix:{seed}:{split}")
        names = sorted(FAMILIES)
        picks = [rng.choice(names) for _ in range(n)]
        pools = {
            name: iter(FAMILIES[name].examples(picks.count(name), seed, split)) for name in names
        }
        return [next(pools[name]) for name in picks]

    def is_correct(self, completion: str, example: Example) -> bool:
        return get_task(example.task).is_correct(completion, example)


@dataclass(frozen=True)
class ChatArithmeticTask:
    """Two-digit arithmetic asked in words, for pretrained chat models (`opdlab demo --real`).

    `What is 71 - 40? Reply with just the number.` -> `31`. Chat models answer in their own
    words ("71 - 40 = 31"), so the checker reads the *last* integer in the completion.
    Subtraction keeps the larger operand first, so answers are never negative.
    """

    name: str
    op: str  # "+" or "-"

    def draw(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if self.op == "-":
            a, b = max(a, b), min(a, b)
        answer = a + b if self.op == "+" else a - b
        return f"What is {a} {self.op} {b}? Reply with just the number.", str(answer)

    def examples(self, n: int, seed: int, split: Split) -> list[Example]:
        return _sample_split(self.name, self.draw, n, seed, split)

    def is_correct(self, completion: str, example: Example) -> bool:
        return last_integer(completion) == example.answer.strip()


def last_integer(text: str) -> str | None:
    """The last integer written in `text` ("71 - 40 = 31." -> "31"), None if there is none."""
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return found[-1].lstrip("+") if found else None


# Tasks for pretrained chat models; not part of `mix` (the tiny pairs' training mixture).
CHAT_TASKS: dict[str, Task] = {
    "chat-addition": ChatArithmeticTask(name="chat-addition", op="+"),
    "chat-subtraction": ChatArithmeticTask(name="chat-subtraction", op="-"),
}

_ALL: dict[str, Task] = {**FAMILIES, "mix": MixTask(), **CHAT_TASKS}


def task_names() -> list[str]:
    """Names `get_task` accepts: the families, then `mix`."""
    return list(_ALL)


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name is a UserError listing the known ones."""
    try:
        return _ALL[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}") from None


def accuracy(completions: list[str], examples: list[Example]) -> float:
    """Fraction of completions that the examples' own checkers accept (0.0 for no examples)."""
    if len(completions) != len(examples):
        raise ValueError(f"accuracy: {len(completions)} completions for {len(examples)} examples")
    if not examples:
        return 0.0
    right = sum(get_task(ex.task).is_correct(c, ex) for c, ex in zip(completions, examples))
    return right / len(examples)
