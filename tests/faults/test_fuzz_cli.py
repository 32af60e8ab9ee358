"""Fuzzing through the real CLI: mutated model folders and random config values.

Each example runs `opdlab.cli.main` in-process on a fresh copy of a tiny model whose safetensors
header, tensor values, shard index or config.json was mutated, or with random `--set` values, and
asserts what the CLI promises: exit 0 or exit 2 with one error line, no traceback, and nothing
outside `--out` changed (the inputs and everything else under the example's folder hash the same).
Example counts are small so the whole file stays well under a minute on two busy cores (about 20 s);
`FUZZ_CLI_EXAMPLES=N` runs more.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from helpers import SMALL, cli_outcome, tree_digest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FUZZ_CLI_EXAMPLES", "6"))
CLI_FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def outside(root: Path, out: Path) -> dict:
    """Digest of everything under `root` except `out` (which the command may write)."""
    return {k: v for k, v in tree_digest(root).items() if not (root / k).resolve().is_relative_to(out.resolve())}


def run_checked(argv: list[str], root: Path, out: Path, capsys) -> str | None:
    before = outside(root, out)
    line = cli_outcome(argv, capsys)
    assert outside(root, out) == before, f"{argv}: changed files outside --out"
    return line


# ----------------------------------------------------------------------------- model-folder mutations


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


json_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3))


@st.composite
def mutations(draw):
    """A `Mutation` changing one thing in a copy of the model folder."""
    kind = draw(st.sampled_from(["header", "values", "truncate", "index", "config"]))
    pick = draw(st.integers(0, 10**6))
    value = draw(json_values)
    special = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, 3e38, 0.0]))
    cut = draw(st.floats(0.0, 1.0))

    def apply(folder: Path) -> None:
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        header, payload = _header(data)
        names = sorted(k for k in header if k != "__metadata__")
        name = names[pick % len(names)]
        if kind == "header":
            entry = header[name]
            field = ["dtype", "shape", "data_offsets"][pick % 3]
            entry[field] = value if pick % 2 else {"dtype": "F64", "shape": [0], "data_offsets": [0, 0]}[field]
            weights.write_bytes(_pack(header, payload))
        elif kind == "values":
            import torch
            from safetensors.torch import load_file, save_file

            tensors = {k: v.clone() for k, v in load_file(str(weights)).items()}
            t = tensors[name].to(torch.float64 if abs(special) > 1e38 and special == special else tensors[name].dtype)
            t.view(-1)[pick % t.numel()] = special
            tensors[name] = t
            save_file(tensors, str(weights), metadata={"format": "pt"})
        elif kind == "truncate":
            weights.write_bytes(data[: int(len(data) * cut)])
        elif kind == "index":
            weight_map = {n: "model.safetensors" for n in names}
            choice = pick % 5
            if choice == 0:
                weight_map = value
            elif choice == 1:
                weight_map[name] = "../" + "model.safetensors"
            elif choice == 2:
                weight_map[name] = str(weights.resolve())
            elif choice == 3:
                weight_map[name] = value
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        else:
            config = json.loads((folder / "config.json").read_text())
            keys = sorted(config)
            key = ["vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings",
                   "num_hidden_layers", keys[pick % len(keys)]][pick % 6]
            config[key] = value
            (folder / "config.json").write_text(json.dumps([config] if pick % 17 == 0 else config))

    return Mutation(kind, f"pick={pick} value={value!r} special={special} cut={cut:.3f}", apply)


class Mutation:
    """One drawn mutation: its kind, the drawn parameters (shown when a property fails) and `apply(folder)`."""

    def __init__(self, kind: str, params: str, apply) -> None:
        self.kind, self.params, self.apply = kind, params, apply

    def __repr__(self) -> str:
        return f"Mutation({self.kind}: {self.params})"


@CLI_FUZZ
@given(mutations(), st.sampled_from(["analyze", "mask"]))
def test_mutated_checkpoints_through_analyze_and_mask(pair, capsys, mutation, command):
    kind, apply = mutation.kind, mutation.apply
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, tuned = root / "base", root / "tuned"
        shutil.copytree(pair[0], base)
        shutil.copytree(pair[0], tuned)
        apply(tuned)
        out = root / "out"
        target = out if command == "analyze" else out / "m.safetensors"
        argv = [command, str(base), str(tuned), "--out", str(target)]
        line = run_checked(argv, root, out, capsys)
        if line is None and kind in ("truncate", "index") and command == "analyze":
            assert (out / "analysis.json").is_file()


@CLI_FUZZ
@given(mutations().filter(lambda m: m.kind in ("config", "index")))
def test_mutated_student_folders_through_distill(pair, capsys, mutation):
    apply = mutation.apply
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student = root / "student"
        shutil.copytree(pair[0], student)
        apply(student)
        out = root / "run"
        argv = ["distill", "--student", str(student), "--teacher", str(pair[1]), "--task", "addition",
                "--steps", "1", "--out", str(out), *SMALL, "--set", "data.num_eval=2"]
        run_checked(argv, root, out, capsys)


# ----------------------------------------------------------------------------- config values

FIELDS = ["optim.lr", "optim.eps", "optim.beta1", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps",
          "run.seed", "run.steps", "run.eval_every", "rollout.temperature", "rollout.top_p", "rollout.max_new_tokens",
          "rollout.micro_batch", "loss.beta", "loss.top_k", "loss.loss", "method", "data.max_prompt_tokens", "bogus"]
EDGES = [-1, 0, 1e-300, 1e20, 1e38, 1e300, 2**63, 2**64, -(2**63) - 1, float("nan"), float("-inf")]
values = st.one_of(st.sampled_from(EDGES), st.integers(-2**66, 2**66), st.floats(allow_nan=True, allow_infinity=True),
                   st.booleans(),
                   st.sampled_from(["1e-3", "[1, 2]", "{a: 1}", "&a [*a]", "sft", "rl", "jsd", "''", "null", "0x10"]),
                   st.text(max_size=8))


@CLI_FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3))
@example([("optim.eps", -1)])  # values that once ended in a traceback (now one line each)
@example([("run.seed", 2**64)])
@example([("optim.lr", 1e38)])
def test_random_config_values_through_distill(pair, capsys, items):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "run"
        sets = [a for key, value in items for a in ("--set", f"{key}={value}")]
        argv = ["distill", "--student", str(pair[0]), "--teacher", str(pair[1]), "--task", "addition",
                "--steps", "1", "--out", str(out), *SMALL, "--set", "data.num_eval=2", *sets,
                "--set", "run.steps=1"]  # whatever was drawn for run.steps, train at most one step
        run_checked(argv, root, out, capsys)


@pytest.fixture(autouse=True, scope="module")
def _quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
