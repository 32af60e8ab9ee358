"""Prompts reader: a good file, and one clear error line for each kind of bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from opdlab.data import prompts as P
from opdlab.data.tasks import Example
from opdlab.errors import UserError


def _write(tmp_path: Path, text: str, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_good_jsonl_file(tmp_path: Path) -> None:
    rows = [
        {"prompt": "add:12+5", "answer": "17", "task": "add"},
        {"prompt": "what is 6*7?", "answer": 42},
        {"prompt": "sort:c,a", "privileged": "hint: a < c", "extra": [1, 2]},
    ]
    path = _write(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert P.read_prompts(path) == [
        Example(prompt="add:12+5", answer="17", task="add"),
        Example(prompt="what is 6*7?", answer="42", task=""),
        Example(prompt="sort:c,a", answer="", task="", privileged="hint: a < c"),
    ]


def test_custom_field_names(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps({"question": "q1", "solution": "s1"}) + "\n")
    got = P.read_prompts(path, prompt_field="question", answer_field="solution", require_answer=True)
    assert got == [Example(prompt="q1", answer="s1", task="")]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"prompt": "a"}\n{"prompt": "b",}\n', r"p\.jsonl: line 2: not valid JSON"),
        ('{"prompt": "a"}\n["prompt"]\n', r"line 2: expected a JSON object.*got list"),
        ('{"prompt": "a"}\n{"text": "b"}\n', r"line 2: field 'prompt' is missing"),
        ('{"prompt": 7}\n', r"line 1: field 'prompt' must be a string, got int"),
        ('{"prompt": "  "}\n', r"line 1: field 'prompt' is empty"),
        ('{"prompt": "a", "task": 3}\n', r"line 1: field 'task' must be a string"),
        ('{"prompt": "a"}\n\n{"prompt": "b"}\n', r"line 2: empty line"),
        ("", r"p\.jsonl: no prompts in the file"),
        ("\n  \n", r"no prompts in the file"),
    ],
)
def test_bad_jsonl_gives_one_line_naming_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=expected) as info:
        P.read_prompts(path)
    assert "\n" not in str(info.value)


def test_missing_answer_when_required(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n{"prompt": "c", "answer": ""}\n')
    assert len(P.read_prompts(path)) == 3
    with pytest.raises(UserError, match=r"line 2: field 'answer' is missing or empty"):
        P.read_prompts(path, require_answer=True)


def test_missing_file_unsupported_suffix_and_plain_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl: prompts file not found"):
        P.read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=r"unsupported prompts format '\.csv'"):
        P.read_prompts(_write(tmp_path, "prompt\nx\n", "p.csv"))
    with pytest.raises(UserError, match=r"not a `datasets` folder"):
        P.read_prompts(tmp_path)
    with pytest.raises(UserError, match="not UTF-8"):
        (tmp_path / "bin.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
        P.read_prompts(tmp_path / "bin.jsonl")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(UserError, match=r"p\.parquet: reading \.parquet needs pyarrow; run `pip install pyarrow`"):
        P.read_prompts(_write(tmp_path, "", "p.parquet"))


def test_datasets_folder_without_datasets_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    real = importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(UserError, match=r"ds: reading a `datasets` folder needs the datasets package"):
        P.read_prompts(folder)


@pytest.mark.optional
@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is optional and not installed")
def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), path)
    assert P.read_prompts(path) == [Example("a", "1", ""), Example("b", "", "")]
    with pytest.raises(UserError, match=r"p\.parquet: row 2: field 'answer'"):
        P.read_prompts(path, require_answer=True)


@pytest.mark.optional
@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is optional and not installed")
def test_datasets_folder_round_trip(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa

    # Built from an arrow table with an explicit fingerprint: from_dict's dill hashing breaks on
    # some pyarrow/dill version mixes, which is not what this test is about.
    table = pa.table({"prompt": ["a", ""], "answer": ["1", "2"]})
    datasets.Dataset(table, fingerprint="opdlab-test").save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": datasets.Dataset(table.slice(0, 1), fingerprint="t")}).save_to_disk(str(tmp_path / "dd"))
    assert P.read_prompts(tmp_path / "dd") == [Example("a", "1", "")]  # the only split is used
    with pytest.raises(UserError, match=r"ds: row 2: field 'prompt' is empty"):
        P.read_prompts(tmp_path / "ds")


def test_check_prompt_lengths_names_the_long_line(tmp_path: Path) -> None:
    from opdlab.models.tokenizer import build_tokenizer

    tok = build_tokenizer()  # one token per character; template adds <bos><|user|> ... <|assistant|>
    examples = [Example("add:1+2", "3", "add"), Example("add:" + "1+" * 20 + "1", "21", "add")]
    P.check_prompt_lengths(examples, tok, max_tokens=60, source="p.jsonl")
    P.check_prompt_lengths(examples[:1], tok, max_tokens=10, source="p.jsonl")  # 7 chars + 3 = 10 tokens
    with pytest.raises(UserError, match=r"p\.jsonl: line 2: prompt is 48 tokens after the chat template.*max_prompt_tokens=40"):
        P.check_prompt_lengths(examples, tok, max_tokens=40, source="p.jsonl")
    with pytest.raises(UserError, match=r"line 1: prompt is 10 tokens"):
        P.check_prompt_lengths(examples[:1], tok, max_tokens=9, source="p.jsonl")
