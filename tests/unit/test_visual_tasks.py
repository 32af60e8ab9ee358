"""The synthetic visual task: determinism, disjoint splits, answers that match the pixels."""

from __future__ import annotations

import pytest

from opdlab.data.tasks import split_of
from opdlab.data.visual_tasks import (
    BACKGROUND,
    CELL_CODES,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    get_visual_task,
    user_turn,
    visual_accuracy,
    visual_task_names,
)
from opdlab.errors import UserError
from opdlab.models.tokenizer import CHARACTERS


def _cell_colors(image) -> dict[int, set[tuple[int, int, int]]]:
    """Non-background colours seen in each quadrant of a rendered image (an independent reading)."""
    half = image.size[0] // 2
    seen: dict[int, set[tuple[int, int, int]]] = {i: set() for i in range(4)}
    for y in range(image.size[1]):
        for x in range(image.size[0]):
            px = image.getpixel((x, y))
            if px != BACKGROUND:
                seen[2 * (y // half) + (x // half)].add(px)
    return seen


def test_examples_are_deterministic_in_the_seed():
    task = get_visual_task("shapes")
    a, b = task.examples(30, seed=3, split="train"), task.examples(30, seed=3, split="train")
    assert [(e.prompt, e.answer) for e in a] == [(e.prompt, e.answer) for e in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    c = task.examples(30, seed=4, split="train")
    assert [e.scene.key() for e in a] != [e.scene.key() for e in c]


def test_train_and_eval_are_disjoint():
    task = get_visual_task("shapes")
    train = {f"{e.scene.key()}|{e.prompt}" for e in task.examples(400, seed=0, split="train")}
    evals = {f"{e.scene.key()}|{e.prompt}" for e in task.examples(100, seed=0, split="eval")}
    assert len(train) == 400 and len(evals) == 100  # distinct within a split
    assert not train & evals
    assert all(split_of(k) == "eval" for k in evals)


def test_answers_agree_with_the_rendered_pixels():
    """Read each image back pixel by pixel and re-derive the answer independently."""
    names = {rgb: name for name, rgb in COLORS.items()}
    for ex in get_visual_task("shapes").examples(60, seed=1, split="train"):
        assert ex.image.size == (IMAGE_SIZE, IMAGE_SIZE) and ex.image.mode == "RGB"
        cells = _cell_colors(ex.image)
        occupied = {cell: names[next(iter(c))] for cell, c in cells.items() if c}
        assert all(len(c) <= 1 for c in cells.values()), "a shape leaked out of its quadrant"
        if ex.task == "shapes-count":
            assert ex.answer == str(len(occupied))
        elif ex.task == "shapes-color":
            code = ex.prompt.removeprefix("color at ").removesuffix("?")
            assert ex.answer == occupied[CELL_CODES.index(code)]
        else:
            color = ex.prompt.removeprefix("where is ").removesuffix("?")
            assert ex.answer == POSITIONS[[c for c, name in occupied.items() if name == color][0]]


def test_mixture_covers_every_family_and_prompts_fit_the_tokenizer():
    examples = get_visual_task("shapes").examples(90, seed=0, split="eval")
    assert {e.task for e in examples} == {"shapes-count", "shapes-color", "shapes-position"}
    for e in examples:
        assert set(e.prompt + e.answer) <= set(CHARACTERS)
        assert user_turn(e.prompt)[0]["content"][-1] == {"type": "image"}


def test_checker_and_accuracy():
    ex = get_visual_task("shapes-color").examples(2, seed=0, split="eval")
    assert visual_accuracy([f" {ex[0].answer}\n", "purple"], ex) == 0.5
    assert visual_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        visual_accuracy(["x"], [])


def test_bad_requests_are_user_errors():
    assert visual_task_names() == ["shapes-count", "shapes-color", "shapes-position", "shapes"]
    with pytest.raises(UserError, match="unknown visual task"):
        get_visual_task("nope")
    with pytest.raises(UserError, match="split"):
        get_visual_task("shapes").examples(1, seed=0, split="test")  # type: ignore[arg-type]  # invalid on purpose
