"""Property-based tests: any input to the config loader, prompts reader, mask reader and checkpoint
reader either loads or raises `UserError` (one line) — never another exception.

Inputs are both raw bytes/text and structured near-misses (valid YAML with odd keys and values,
JSON lines of odd records, safetensors headers with odd dtypes, shapes and offsets), because
random bytes rarely get past the first parser. Example counts are modest to keep the suite fast.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from opdlab.analysis.pairs import Checkpoint
from opdlab.config import parse_set
from opdlab.config import DistillConfig, load_config
from opdlab.data.prompts import read_prompts
from opdlab.errors import UserError
from opdlab.subnet.masks import load_mask

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def loads_or_user_error(fn, *args) -> object:
    """Call fn; a UserError must be one line. Any other exception fails the test (with its input)."""
    try:
        return fn(*args)
    except UserError as exc:
        assert "\n" not in str(exc), repr(str(exc))
        return exc


# ----------------------------------------------------------------------------- config

FIELD_NAMES = ["method", "out", "model", "data", "rollout", "loss", "optim", "run", "student", "teacher", "lr",
               "beta", "steps", "seed", "mask", "schedule", "on_nonfinite", "prompts", "top_k", "save_dtype", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["1e-5", "opd", "cosine", "stop", "bf16", ".inf", "0x10"]))
yaml_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.integers(0, 3), st.none()), kids, max_size=4)),
    max_leaves=12)


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.integers(0, 3), st.booleans()), yaml_values, max_size=5))
@example({1: 2, "foo": 3})  # keys of mixed types
@example({"optim": {"lr": float("nan")}})
def test_config_loader_structured(work, data):
    path = work / "structured.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    result = loads_or_user_error(load_config, DistillConfig, path)
    assert isinstance(result, (DistillConfig, UserError))


@FUZZ
@given(st.text(max_size=200))
@example("optim: {lr: [1")
@example("!!python/object/apply:os.system ['true']")
@example("a: &x [*x]")
def test_config_loader_raw_text(work, text):
    path = work / "raw.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    loads_or_user_error(load_config, DistillConfig, path)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["optim.lr", "loss.beta", "run.steps", "method", "run", "x.y", "", "run.steps.x"]),
                          st.text(max_size=12)), max_size=3))
@example([("optim.lr", "[1")])
@example([("run.steps", "{")])
def test_cli_set_overrides(items):
    """`--set KEY=VALUE` values are YAML too: a malformed one is a one-line error."""
    flags = [f"{k}={v}" for k, v in items]
    loads_or_user_error(lambda: load_config(DistillConfig, None, parse_set(flags)))


# ----------------------------------------------------------------------------- prompts

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
                           lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                           max_leaves=8)
records = st.one_of(json_values, st.fixed_dictionaries({"prompt": json_values}, optional={"answer": json_values,
                                                                                          "task": json_values}))


@FUZZ
@given(st.binary(max_size=300))
@example(b'{"prompt": "a"}\n\n{"prompt": "b"}\n')
@example(b"\xff\xfe")
def test_prompts_reader_raw_bytes(work, data):
    path = work / "raw.jsonl"
    path.write_bytes(data)
    loads_or_user_error(read_prompts, path)


@FUZZ
@given(st.lists(records, max_size=5))
def test_prompts_reader_structured(work, rows):
    path = work / "structured.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    loads_or_user_error(read_prompts, path)


@FUZZ
@given(st.lists(st.text(min_size=1, max_size=30).filter(lambda s: s.strip()), min_size=1, max_size=5))
@example(["line\u2028separator", "next\x85line"])  # valid JSON text that str.splitlines would cut
def test_prompts_reader_round_trips_any_text(work, prompts):
    """Whatever text a prompt holds, a .jsonl written by json.dumps reads back exactly."""
    path = work / "roundtrip.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    assert [e.prompt for e in read_prompts(path)] == prompts


# ----------------------------------------------------------------------------- masks and checkpoints

DTYPES = ["BOOL", "F32", "BF16", "I64", "U8", "F64", "XYZ", ""]
shapes = st.lists(st.integers(0, 4), max_size=3)


@st.composite
def safetensors_files(draw) -> bytes:
    """A safetensors-like file: a JSON header of random entries, then a payload of random length."""
    header: dict = {}
    offset = 0
    for i in range(draw(st.integers(0, 3))):
        dtype, shape = draw(st.sampled_from(DTYPES)), draw(shapes)
        size = draw(st.one_of(st.just(None), st.integers(0, 40)))
        if size is None:  # consistent offsets for the dtype's itemsize
            size = {"F32": 4, "BF16": 2, "I64": 8, "F64": 8}.get(dtype, 1)
            for d in shape:
                size *= d
        name = draw(st.sampled_from(["model.norm.weight", f"t{i}", "", "__metadata__x"]))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers()), max_size=2))
    raw = json.dumps(header).encode()
    declared = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**40)))
    payload = draw(st.binary(min_size=0, max_size=offset + 8))
    return struct.pack("<Q", declared) + raw + payload


@FUZZ
@given(st.one_of(st.binary(max_size=200), safetensors_files()))
def test_mask_reader(work, data):
    path = work / "mask.safetensors"
    path.write_bytes(data)
    result = loads_or_user_error(load_mask, path)
    if not isinstance(result, UserError):
        masks, meta = result
        assert masks and all(m.dtype.is_floating_point is False for m in masks.values())
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


@FUZZ
@given(st.one_of(st.binary(max_size=200), safetensors_files()))
def test_checkpoint_reader(work, data):
    """The analysis reader: open, list, and read every tensor."""
    path = work / "model.safetensors"
    path.write_bytes(data)

    def read_all() -> None:
        ck = Checkpoint(path)
        for name in ck.names():
            ck.shape(name)
            ck.get(name)

    loads_or_user_error(read_all)
