"""Read user prompts from a file (.jsonl, .parquet) or a Hugging Face `datasets` folder.

Every problem in the input is one `UserError` line naming the file, the line (row) and the
field, e.g. ``prompts.jsonl: line 3: field 'prompt' is missing; ...``. Records are numbered
from 1: record N is line N of a .jsonl file (blank lines are only allowed at the end, so that
this stays true) and row N of a table.

Example::

    examples = read_prompts("data/train.jsonl", require_answer=True)
    check_prompt_lengths(examples, tokenizer, max_tokens=512, source="data/train.jsonl")
    prompt_ids = render_prompts(tokenizer, [e.prompt for e in examples])   # what rollouts sample from
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from opdlab.data.tasks import Example
from opdlab.data.visual_tasks import VisualExample
from opdlab.errors import UserError


def read_prompts(
    path: str | Path,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    task_field: str = "task",
    require_answer: bool = False,
    privileged_field: str = "privileged",
    image_field: str | None = None,
) -> list[Example]:
    """The prompts at `path` as `Example`s (answer "" and task "" when the record has none).

    With `image_field` (vision-language pairs) every record names an image file, as a path
    relative to the prompts file (or absolute); the records come back as
    `opdlab.data.visual_tasks.VisualExample`s holding the loaded RGB image.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: prompts file not found; check the path given to --prompts")
    if path.is_dir():
        records, unit = _iter_datasets_folder(path), "row"
    elif path.suffix == ".jsonl":
        records, unit = _iter_jsonl(path), "line"
    elif path.suffix == ".parquet":
        records, unit = _iter_parquet(path), "row"
    else:
        raise UserError(f"{path}: unsupported prompts format {path.suffix!r}; use .jsonl, .parquet or a `datasets` folder")
    examples = []
    for number, record in records:
        where = f"{path}: {unit} {number}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object like {{\"{prompt_field}\": \"...\"}}, got {type(record).__name__}")
        prompt = record.get(prompt_field)
        if prompt is None:
            raise UserError(f"{where}: field '{prompt_field}' is missing; every record needs a '{prompt_field}' string (or set data.prompt_field)")
        if not isinstance(prompt, str):
            raise UserError(f"{where}: field '{prompt_field}' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise UserError(f"{where}: field '{prompt_field}' is empty; remove the record or give it text")
        answer = _optional_text(record, answer_field, where, allow_int=True)
        if require_answer and not answer:
            raise UserError(f"{where}: field '{answer_field}' is missing or empty; accuracy needs an answer on every record")
        task = _optional_text(record, task_field, where, allow_int=False)
        privileged = _optional_text(record, privileged_field, where, allow_int=False) or None
        if image_field is not None:
            image = _read_image(record.get(image_field), image_field, path.parent, where)
            examples.append(VisualExample(prompt=prompt, answer=answer, task=task, image=image, privileged=privileged))
            continue
        examples.append(Example(prompt=prompt, answer=answer, task=task, privileged=privileged))
    if not examples:
        raise UserError(f"{path}: no prompts in the file; it needs at least one record with a '{prompt_field}' field")
    return examples


def _read_image(value: Any, field: str, folder: Path, where: str) -> Any:
    """Open the image a record names (path relative to the prompts file) as RGB; one-line errors."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field '{field}' is missing or not a path; every record of a vision-language "
                        f"prompts file needs an image path (relative to the file), or set data.image_field")
    image_path = Path(value) if Path(value).is_absolute() else folder / value
    try:
        with Image.open(image_path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{where}: image {value!r} not found (looked for {image_path})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{where}: image {value!r} cannot be read as an image ({type(exc).__name__}); "
                        "use PNG or JPEG") from None


def render_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as a user turn plus the generation prompt (the chat template).

    A tokenizer without a chat template (a base model) gets the plain text tokens.
    """
    out: list[list[int]] = []
    for text in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out.append(list(ids))
    return out


def check_prompt_lengths(examples: list[Example], tokenizer: Any, max_tokens: int, source: str | Path,
                         context: tuple[int, int, str] | None = None) -> None:
    """Raise a UserError naming the first prompt longer than `max_tokens` after the chat template.

    `context` = (positions, max_new_tokens, model): a model with learned positions takes at most
    `positions` tokens, so a prompt must also leave room for `max_new_tokens` of completion.
    Prompts are rendered exactly as rollouts render them (`render_prompts`): one rendering path
    for counting and sampling.
    """
    unit = "line" if str(source).endswith(".jsonl") else "row"
    for number, ids in enumerate(render_prompts(tokenizer, [e.prompt for e in examples]), start=1):
        if len(ids) > max_tokens:
            raise UserError(
                f"{source}: {unit} {number}: prompt is {len(ids)} tokens after the chat template, more than "
                f"max_prompt_tokens={max_tokens}; shorten it or raise data.max_prompt_tokens"
            )
        if context is not None and len(ids) + context[1] > context[0]:
            positions, new_tokens, model = context
            raise UserError(
                f"{source}: {unit} {number}: prompt is {len(ids)} tokens after the chat template; with "
                f"rollout.max_new_tokens={new_tokens} that is more than the {positions} positions of {model}; "
                "shorten the prompt or lower rollout.max_new_tokens"
            )


def _optional_text(record: dict[str, Any], field: str, where: str, allow_int: bool) -> str:
    value = record.get(field)
    if value is None:
        return ""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # numeric answers are common in math sets; compared as text
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the prompts file as UTF-8") from None
    # Split on \n only: str.splitlines also cuts at U+2028, U+0085 ..., which JSON strings may hold raw.
    lines = text.rstrip().split("\n") if text.strip() else []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise UserError(f"{path}: line {number}: empty line; remove blank lines between records")
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    if importlib.util.find_spec("pyarrow") is None:
        raise UserError(f"{path}: reading .parquet needs pyarrow; run `pip install pyarrow` or convert the file to .jsonl")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read as parquet ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _iter_datasets_folder(path: Path) -> Iterator[tuple[int, Any]]:
    if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise UserError(f"{path}: a folder but not a `datasets` folder saved with save_to_disk; pass a .jsonl/.parquet file or such a folder")
    if importlib.util.find_spec("datasets") is None:
        raise UserError(f"{path}: reading a `datasets` folder needs the datasets package; run `pip install datasets`")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise UserError(f"{path}: holds splits {sorted(loaded)} and none is 'train'; save the split you want on its own")
    yield from enumerate(loaded, start=1)
