"""Bad input through the real CLI: exit code 2, one stderr line naming what is wrong and where, no traceback.

Many of these checks have unit tests next to their modules; here each is driven through
`opdlab.cli.main` as a user would meet it. `--debug` turns the one line back into a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli_error, distill_args
from safetensors.torch import load_file, save_file

from opdlab.cli import main
from opdlab.errors import UserError
from opdlab.models.zoo import save_random_model


def weights_of(model_dir: Path) -> Path:
    return model_dir / "model.safetensors"


@pytest.fixture(scope="module")
def broken(tmp_path_factory, pair) -> dict[str, Path]:
    """Damaged copies of the student: truncated, garbage header, absurd header length."""
    root = tmp_path_factory.mktemp("broken")
    data = weights_of(pair[0]).read_bytes()
    out = {}
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", os.urandom(64) + data[64:]),
                          ("huge_header", (10**12).to_bytes(8, "little") + data[8:]), ("empty", b"")):
        folder = root / name
        shutil.copytree(pair[0], folder)
        weights_of(folder).write_bytes(content)
        out[name] = folder
    return out


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["truncated", "garbage", "huge_header", "empty"])
def test_damaged_safetensors_in_analyze_names_the_file(broken, pair, tmp_path, capsys, kind):
    line = cli_error(["analyze", str(weights_of(broken[kind])), str(pair[0]), "--out", str(tmp_path / "a")], capsys)
    assert str(weights_of(broken[kind])) in line and "safetensors" in line
    assert not (tmp_path / "a").exists()  # inputs are checked before --out is created


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_damaged_safetensors_in_mask_and_compare(broken, pair, tmp_path, capsys, kind):
    bad = str(broken[kind])
    assert str(weights_of(broken[kind])) in cli_error(["mask", str(pair[0]), bad, "--out", str(tmp_path / "m.safetensors")], capsys)
    assert str(weights_of(broken[kind])) in cli_error(["compare", str(pair[0]), str(pair[0]), bad, "--out", str(tmp_path / "c")], capsys)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_damaged_safetensors_as_student_or_teacher(broken, pair, tmp_path, capsys, kind):
    line = cli_error(distill_args((broken[kind], pair[1]), tmp_path / "run", 1), capsys)
    assert str(broken[kind]) in line and "--student" in line
    line = cli_error(distill_args((pair[0], broken[kind]), tmp_path / "run2", 1), capsys)
    assert str(broken[kind]) in line and "--teacher" in line


def test_folder_that_is_not_a_model(pair, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("hello")
    assert "not a model folder" in cli_error(["analyze", str(notes), str(pair[0]), "--out", str(tmp_path / "a")], capsys)
    assert "not a model folder" in cli_error(["mask", str(pair[0]), str(notes), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert "not a model folder" in cli_error(distill_args((notes, pair[1]), tmp_path / "run", 1), capsys)
    # config.json but no weights
    (notes / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "no *.safetensors" in cli_error(distill_args((pair[0], notes), tmp_path / "run", 1), capsys)
    missing = tmp_path / "missing"
    assert str(missing) in cli_error(["analyze", str(missing), str(pair[0]), "--out", str(tmp_path / "a")], capsys)


def test_mismatched_tensors_in_analyze_compare_mask(pair, tmp_path, capsys):
    # The teacher has hidden size 48, the student 32: same names, different shapes.
    student, teacher = map(str, pair)
    for argv in (["analyze", student, teacher, "--out", str(tmp_path / "a")],
                 ["compare", student, student, teacher, "--out", str(tmp_path / "c")],
                 ["mask", student, teacher, "--out", str(tmp_path / "m.safetensors")]):
        line = cli_error(argv, capsys)
        assert "do not match" in line and "shape [" in line, line
    # Renamed tensors: only in base / only in tuned.
    weights = load_file(str(weights_of(pair[0])))
    renamed = tmp_path / "renamed.safetensors"
    save_file({k.replace("mlp", "ffn"): v for k, v in weights.items()}, str(renamed))
    line = cli_error(["analyze", student, str(renamed), "--out", str(tmp_path / "a")], capsys)
    assert "only in base" in line and "--skip-mismatched" in line


# ----------------------------------------------------------------------------- masks


def test_masks_that_do_not_fit_the_model(pair, tmp_path, capsys):
    student, teacher = pair
    weights = load_file(str(weights_of(teacher)))
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file({k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}, str(wrong_shape))
    line = cli_error(distill_args(pair, tmp_path / "r1", 1, "--mask", str(wrong_shape)), capsys)
    assert str(wrong_shape) in line and "shape" in line and "another model" in line

    unknown = tmp_path / "unknown.safetensors"
    save_file({"model.layers.99.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bool)}, str(unknown))
    line = cli_error(distill_args(pair, tmp_path / "r2", 1, "--mask", str(unknown)), capsys)
    assert "model.layers.99.mlp.up_proj.weight" in line and "not a parameter" in line

    not_bool = tmp_path / "float.safetensors"
    save_file({"model.norm.weight": torch.ones(32)}, str(not_bool))
    line = cli_error(distill_args(pair, tmp_path / "r3", 1, "--mask", str(not_bool)), capsys)
    assert "model.norm.weight" in line and "bool" in line
    line = cli_error(["mask", "--random-like", str(not_bool), "--out", str(tmp_path / "c.safetensors")], capsys)
    assert "bool" in line

    missing = tmp_path / "nope.safetensors"
    assert "mask file not found" in cli_error(distill_args(pair, tmp_path / "r4", 1, "--mask", str(missing)), capsys)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 7)
    assert str(garbage) in cli_error(["mask", "--random-like", str(garbage), "--out", str(tmp_path / "d.safetensors")], capsys)


# ----------------------------------------------------------------------------- tokenizers


def test_teacher_with_a_different_tokenizer(pair, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(pair[1], teacher)
    spec = json.loads((teacher / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same tokens, two ids swapped
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    line = cli_error(distill_args((pair[0], teacher), tmp_path / "run", 1), capsys)
    assert "tokenizers differ" in line and "'a'" in line and str(teacher) in line


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("lines, needle", [
    (['{"prompt": "add:1+2"}', '{"prompt": "add:3+4"', '{"prompt": "x"}'], "line 2: not valid JSON"),
    (['{"question": "add:1+2"}'], "line 1: field 'prompt' is missing"),
    (['{"prompt": "add:1+2"}', '{"prompt": "add:1+3"}', '{"prompt": "   "}'], "line 3: field 'prompt' is empty"),
    (['{"prompt": 12}'], "line 1: field 'prompt' must be a string"),
    (['["add:1+2"]'], "line 1: expected a JSON object"),
    (['{"prompt": "add:1+2"}', '', '{"prompt": "add:1+3"}'], "line 2: empty line"),
    ([], "no prompts"),
])
def test_bad_prompts_files(pair, tmp_path, capsys, lines, needle):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    line = cli_error(distill_args(pair, tmp_path / "run", 1, "--prompts", str(prompts)), capsys)
    assert str(prompts) in line and needle in line, line


def test_overlong_prompt_names_its_line(pair, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["add:1+2", "add:4+4", "1" * 200, "add:5+5"]))
    line = cli_error(distill_args(pair, tmp_path / "run", 1, "--prompts", str(prompts),
                                  "--set", "data.max_prompt_tokens=64"), capsys)
    assert f"{prompts}: line 3: prompt is" in line and "max_prompt_tokens=64" in line


def test_prompts_not_utf8_or_unknown_format(pair, tmp_path, capsys):
    latin = tmp_path / "p.jsonl"
    latin.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    assert "not UTF-8" in cli_error(distill_args(pair, tmp_path / "run", 1, "--prompts", str(latin)), capsys)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nadd:1+2\n")
    assert "unsupported prompts format" in cli_error(distill_args(pair, tmp_path / "run", 1, "--prompts", str(csv)), capsys)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("text, needle", [
    ("optim:\n  lr: 1e-4\n  learning_rate: 3\n", "unknown field 'optim.learning_rate'"),
    ("mehtod: opd\n", "unknown field 'mehtod'"),
    ("run:\n  steps: many\n", "field 'run.steps' must be an integer"),
    ("run:\n  steps: 2.5\n", "field 'run.steps' must be an integer"),
    ("loss:\n  beta: 1.5\n", "'loss.beta' must be in [0, 1]"),
    ("loss:\n  beta: -0.1\n", "'loss.beta' must be in [0, 1]"),
    ("optim:\n  lr: -1e-3\n", "'optim.lr' must be positive"),
    ("optim:\n  lr: .nan\n", "field 'optim.lr' must be a number"),
    ("method: dpo\n", "field 'method' must be one of opd, opsd, sft, rl"),
    ("run: 3\n", "field 'run' must be a mapping"),
    ("optim:\n  lr: [1\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("run:\n  on_nonfinite: ignore\n", "field 'run.on_nonfinite' must be one of stop, skip"),
])
def test_bad_config_files(tmp_path, capsys, text, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    line = cli_error(["distill", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert str(cfg) in line and needle in line, line
    assert not (tmp_path / "run").exists()


def test_bad_flags(tmp_path, capsys):
    assert "'optim.lr' must be positive" in cli_error(["distill", "--lr", "-1", "--out", str(tmp_path / "r")], capsys)
    assert "expected KEY=VALUE" in cli_error(["distill", "--set", "loss.beta", "--out", str(tmp_path / "r")], capsys)
    assert "unknown field 'loss.bogus'" in cli_error(["distill", "--set", "loss.bogus=1", "--out", str(tmp_path / "r")], capsys)
    assert "config file not found" in cli_error(["distill", "--config", str(tmp_path / "none.yaml")], capsys)


def test_debug_shows_the_traceback(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("loss:\n  beta: 2\n")
    with pytest.raises(UserError, match="loss.beta"):
        main(["--debug", "distill", "--config", str(cfg)])


# ----------------------------------------------------------------------------- output folders


def test_existing_output_is_refused_unless_overwrite(pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = cli_error(distill_args(pair, out, 1), capsys)
    assert str(out) in line and "--overwrite" in line
    line = cli_error(["analyze", str(pair[0]), str(pair[0]), "--out", str(out)], capsys)
    assert str(out) in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "mine"
    mask_out = tmp_path / "m.safetensors"
    mask_out.write_text("mine")
    assert "--overwrite" in cli_error(["mask", str(pair[0]), str(pair[0]), "--out", str(mask_out)], capsys)
    assert mask_out.read_text() == "mine"
    # --overwrite does not delete a folder opdlab did not write ...
    assert "only replaces folders opdlab wrote" in cli_error(
        ["analyze", str(pair[0]), str(pair[0]), "--out", str(out), "--overwrite"], capsys)
    assert (out / "keep.txt").read_text() == "mine"
    # ... but replaces one it wrote.
    assert main(["analyze", str(pair[0]), str(pair[0]), "--out", str(tmp_path / "a")]) == 0
    (tmp_path / "a" / "extra.txt").write_text("x")
    assert main(["analyze", str(pair[0]), str(pair[0]), "--out", str(tmp_path / "a"), "--overwrite"]) == 0
    assert (tmp_path / "a" / "analysis.json").is_file() and not (tmp_path / "a" / "extra.txt").exists()


def test_output_that_cannot_be_written(pair, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    line = cli_error(["analyze", str(pair[0]), str(pair[0]), "--out", str(blocker / "sub")], capsys)
    assert str(blocker / "sub") in line and "cannot write there" in line
    line = cli_error(distill_args(pair, blocker, 1), capsys)
    assert "not a folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(pair, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = cli_error(["analyze", str(pair[0]), str(pair[0]), "--out", str(locked / "a")], capsys)
        assert "cannot write there" in line
    finally:
        locked.chmod(0o755)


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "not an opdlab run folder" in cli_error(["distill", "--resume", str(tmp_path)], capsys)


def test_models_that_differ_in_architecture_family(pair, tmp_path, capsys):
    """A qwen2 student with a llama teacher of another width is fine to load but cannot be analyzed as a pair."""
    qwen = save_random_model(tmp_path / "qwen", arch="qwen2", seed=3)
    line = cli_error(["analyze", str(qwen), str(pair[1]), "--out", str(tmp_path / "a")], capsys)
    assert "do not match" in line
