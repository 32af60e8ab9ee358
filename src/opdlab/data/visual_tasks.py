"""A synthetic visual task with exact checkers: coloured shapes on a 2 x 2 grid, rendered with Pillow.

Each example is one picture and one question about it. The picture holds 1-4 shapes
(circle, square, triangle), each in its own quadrant and each in a different colour, with a
little seeded jitter in place and size. Questions:

  shapes-count     `how many shapes?`   -> `3`
  shapes-color     `color at tl?`       -> `red`       (cells tl, tr, bl, br)
  shapes-position  `where is blue?`     -> `bottom right`
  shapes           a uniform mixture of the three (each example keeps its own `task`)

Prompts are short and put what distinguishes them (the cell code, the colour's last letter)
at a fixed distance from their end: the tokenizer is character-level, and a tiny model
cannot afford to assemble words from characters at varying positions.

    task = get_visual_task("shapes")
    evals = task.examples(100, seed=0, split="eval")
    evals[0].prompt, evals[0].answer, evals[0].image.size   # ('where is red?', 'top left', (32, 32))
    visual_accuracy(["top left"], evals[:1])                # 1.0

Like `opdlab.data.tasks`, the prompt is the *user message text* (the image follows it
as an image part of the same message, see `user_turn`), answers are checked exactly after
stripping whitespace, and train/eval are disjoint: an instance (scene + question) belongs to
`eval` when a stable hash of its description falls in one fifth of the hash range
(`opdlab.data.tasks.split_of`). Prompts use only characters of the built-in character tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from PIL import Image, ImageDraw

from opdlab.data.tasks import split_of
from opdlab.errors import UserError

Split = Literal["train", "eval"]

IMAGE_SIZE = 32  # pixels per side; a 2 x 2 grid of 16-pixel cells (2 x 2 ViT patches of 8 each)
BACKGROUND = (255, 255, 255)
# Saturated, well separated colours: telling them apart is easy for a tiny vision encoder.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
# Quadrant index -> words (answers) and codes (questions); index = 2 * row + column.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
CELL_CODES = ("tl", "tr", "bl", "br")


@dataclass(frozen=True)
class Shape:
    """One shape in one quadrant: `cell` indexes POSITIONS; `dx`, `dy`, `size` are pixel jitter."""

    kind: str
    color: str
    cell: int
    dx: int
    dy: int
    size: int


@dataclass(frozen=True)
class Scene:
    """A picture's content: shapes in distinct cells with distinct colours (sorted by cell)."""

    shapes: tuple[Shape, ...]

    def key(self) -> str:
        """A canonical text description: the identity of the scene for splits and deduplication."""
        return ";".join(f"{s.kind},{s.color},{s.cell},{s.dx},{s.dy},{s.size}" for s in self.shapes)


@dataclass(frozen=True)
class VisualExample:
    """One problem: the user message text, one image, its exact answer and the family that checks it.

    Mirrors `opdlab.data.tasks.Example` plus `image` (and the `scene` it was drawn from, for
    tests and debugging). `privileged` is extra context only a teacher may see (None here).
    """

    prompt: str
    answer: str
    task: str
    image: Image.Image = field(compare=False, repr=False)
    scene: Scene | None = field(default=None, compare=False, repr=False)
    privileged: str | None = None


def user_turn(prompt: str) -> list[dict[str, Any]]:
    """The chat conversation for a processor's `apply_chat_template`: the question, then the image.

    The image comes last, right before the answer, so the answer sits at a fixed distance from
    each image token whatever the question's length: a tiny model then finds "the top left
    patch" by relative position and leaves its plateau within minutes instead of staying at
    chance (measured: colour questions at chance after 300 steps with the image first).
    """
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]}]


def draw_scene(rng: random.Random) -> Scene:
    """A random scene: 1-4 occupied cells, distinct colours, random shape kinds and jitter."""
    n = rng.randint(1, len(POSITIONS))
    cells = sorted(rng.sample(range(len(POSITIONS)), n))
    colors = rng.sample(sorted(COLORS), n)
    shapes = tuple(
        Shape(
            kind=rng.choice(SHAPES),
            color=color,
            cell=cell,
            dx=rng.randint(-1, 1),
            dy=rng.randint(-1, 1),
            size=rng.randint(10, 12),
        )
        for cell, color in zip(cells, colors)
    )
    return Scene(shapes=shapes)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `scene` as an RGB image of `size` x `size` pixels (deterministic, no anti-aliasing)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(img)
    cell_px = size // 2
    scale = size / IMAGE_SIZE  # jitter and shape size are given for the 32-pixel canvas
    for s in scene.shapes:
        row, col = divmod(s.cell, 2)
        cx = col * cell_px + cell_px / 2 + s.dx * scale
        cy = row * cell_px + cell_px / 2 + s.dy * scale
        half = s.size * scale / 2
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        fill = COLORS[s.color]
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return img


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "how many shapes?", str(len(scene.shapes))


def _ask_color(scene: Scene, rng: random.Random) -> tuple[str, str]:
    s = rng.choice(scene.shapes)
    return f"color at {CELL_CODES[s.cell]}?", s.color


def _ask_position(scene: Scene, rng: random.Random) -> tuple[str, str]:
    s = rng.choice(scene.shapes)
    return f"where is {s.color}?", POSITIONS[s.cell]


QUESTIONS: dict[str, Callable[[Scene, random.Random], tuple[str, str]]] = {
    "shapes-count": _ask_count,
    "shapes-color": _ask_color,
    "shapes-position": _ask_position,
}
MIXTURE = "shapes"


def _check_request(name: str, n: int, split: str) -> None:
    if split not in ("train", "eval"):
        raise UserError(f"visual task '{name}': split must be 'train' or 'eval', got {split!r}")
    if n < 0:
        raise UserError(f"visual task '{name}': number of examples must be >= 0, got {n}")


@dataclass(frozen=True)
class VisualTask:
    """Questions drawn from `families` (one family, or the uniform mixture of all)."""

    name: str
    families: tuple[str, ...]
    image_size: int = IMAGE_SIZE

    def examples(self, n: int, seed: int, split: Split) -> list[VisualExample]:
        """`n` distinct instances of `split`, deterministic in `seed` (images rendered on the way)."""
        _check_request(self.name, n, split)
        rng = random.Random(f"visual:{self.name}:{seed}:{split}")
        seen: set[str] = set()
        out: list[VisualExample] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise UserError(f"visual task '{self.name}': cannot draw {n} distinct {split} examples; ask for fewer")
            family = rng.choice(self.families)
            scene = draw_scene(rng)
            prompt, answer = QUESTIONS[family](scene, rng)
            key = f"{scene.key()}|{prompt}"
            if key in seen or split_of(key) != split:
                continue
            seen.add(key)
            out.append(VisualExample(prompt, answer, family, render(scene, self.image_size), scene))
        return out

    def is_correct(self, completion: str, example: VisualExample) -> bool:
        return completion.strip() == example.answer.strip()


_ALL: dict[str, VisualTask] = {
    **{name: VisualTask(name=name, families=(name,)) for name in QUESTIONS},
    MIXTURE: VisualTask(name=MIXTURE, families=tuple(QUESTIONS)),
}


def visual_task_names() -> list[str]:
    """Names `get_visual_task` accepts: the three families, then the mixture `shapes`."""
    return list(_ALL)


def get_visual_task(name: str) -> VisualTask:
    """The visual task called `name`; an unknown name is a UserError listing the known ones."""
    try:
        return _ALL[name]
    except KeyError:
        raise UserError(f"unknown visual task {name!r}; known: {', '.join(visual_task_names())}") from None


def visual_accuracy(completions: list[str], examples: list[VisualExample]) -> float:
    """Fraction of completions that match their example's answer exactly (0.0 for no examples)."""
    if len(completions) != len(examples):
        raise ValueError(f"visual_accuracy: {len(completions)} completions for {len(examples)} examples")
    if not examples:
        return 0.0
    right = sum(get_visual_task(ex.task).is_correct(c, ex) for c, ex in zip(completions, examples))
    return right / len(examples)
