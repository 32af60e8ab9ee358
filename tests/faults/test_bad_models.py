"""Devices, model metadata and context length: one line naming the device, file or field, exit 2.

Through `opdlab.cli.main`: a device that does not exist here (analyze, mask, compare, distill),
config.json / tokenizer.json that disagree with the weights or have the wrong types, a resume
whose student has the same tensor names but other shapes, and prompts plus max_new_tokens longer
than a model with learned positions can take (an IndexError inside the model before).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SMALL, cli_error, distill_args

from opdlab.cli import main
from opdlab.models.zoo import build_tokenizer, save_random_model

DEVICES = ["nonsense", "meta"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])


@pytest.mark.parametrize("device", DEVICES)
def test_devices_that_do_not_exist_here(pair, tmp_path, capsys, device):
    s = str(pair[0])
    for argv in (["analyze", s, s, "--out", str(tmp_path / "a"), "--device", device],
                 ["mask", s, s, "--out", str(tmp_path / "m.safetensors"), "--device", device],
                 ["compare", s, s, s, "--out", str(tmp_path / "c"), "--device", device],
                 distill_args(pair, tmp_path / "run", 1, "--device", device)):
        line = cli_error(argv, capsys)
        assert repr(device) in line and "device" in line, line
    assert not (tmp_path / "a").exists() and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- metadata


def _edit(src: Path, dst: Path, file: str, change) -> Path:
    shutil.copytree(src, dst)
    (dst / file).write_text(json.dumps(change(json.loads((dst / file).read_text()))))
    return dst


CONFIG_EDITS = {
    "vocab_larger": (lambda c: {**c, "vocab_size": 100}, "vocab_size"),
    "vocab_smaller": (lambda c: {**c, "vocab_size": 20}, "vocab_size"),
    "hidden_str": (lambda c: {**c, "hidden_size": "32"}, "hidden_size"),
    "hidden_float": (lambda c: {**c, "hidden_size": 32.5}, "hidden_size"),
    "heads_zero": (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads"),
    "layers_negative": (lambda c: {**c, "num_hidden_layers": -1}, "num_hidden_layers"),
    "a_list": (lambda c: [c], "JSON object"),
}


@pytest.mark.parametrize("kind", sorted(CONFIG_EDITS))
def test_config_json_that_disagrees_or_has_wrong_types(pair, tmp_path, capsys, kind):
    change, field = CONFIG_EDITS[kind]
    student = _edit(pair[0], tmp_path / "student", "config.json", change)
    line = cli_error(distill_args((student, pair[1]), tmp_path / "run", 1), capsys)
    assert str(student / "config.json") in line and field in line and "--student" in line, line
    teacher = _edit(pair[1], tmp_path / "teacher", "config.json", change)
    line = cli_error(distill_args((pair[0], teacher), tmp_path / "run2", 1), capsys)
    assert str(teacher / "config.json") in line and "--teacher" in line, line


@pytest.mark.parametrize("kind", ["no_model", "null_model", "a_list"])
def test_tokenizer_json_missing_its_parts(pair, tmp_path, capsys, kind):
    change = {"no_model": lambda t: {k: v for k, v in t.items() if k != "model"},
              "null_model": lambda t: {**t, "model": None}, "a_list": lambda t: [t]}[kind]
    student = _edit(pair[0], tmp_path / "student", "tokenizer.json", change)
    line = cli_error(distill_args((student, pair[1]), tmp_path / "run", 1), capsys)
    assert str(student) in line and "tokenizer" in line and "--student" in line, line


def test_resume_with_a_student_of_other_shapes(pair, tmp_path, capsys):
    """Same tensor names, other shapes (the student folder was replaced after the run started)."""
    student = tmp_path / "student"
    shutil.copytree(pair[0], student)
    run = tmp_path / "run"
    assert main(distill_args((student, pair[1]), run, 2, "--set", "run.save_every=1")) == 0
    shutil.rmtree(student)
    save_random_model(student, seed=5, hidden_size=48)
    line = cli_error(["distill", "--resume", str(run), "--steps", "4"], capsys)
    assert "checkpoints/step-2" in line and "shape [52, 32] in the checkpoint but [52, 48]" in line, line


# ----------------------------------------------------------------------------- context length


@pytest.fixture(scope="module")
def learned_positions(tmp_path_factory) -> Path:
    """A tiny GPT-2 (learned absolute positions, 24 of them) with the built-in tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=24, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_prompt_plus_completion_beyond_learned_positions(learned_positions, pair, tmp_path, capsys):
    args = ["distill", "--task", "addition", "--steps", "1", *SMALL]
    # prompts of about 10 tokens + 20 new tokens > 24 positions
    line = cli_error([*args, "--student", str(learned_positions), "--teacher", str(pair[1]),
                      "--out", str(tmp_path / "r1"), "--set", "rollout.max_new_tokens=20"], capsys)
    assert "24 positions" in line and "max_new_tokens=20" in line and str(learned_positions) in line, line
    line = cli_error([*args, "--student", str(pair[0]), "--teacher", str(learned_positions),
                      "--out", str(tmp_path / "r2"), "--set", "rollout.max_new_tokens=30"], capsys)
    assert "24 positions" in line and "teacher" in line, line
    # within the limit it trains
    assert main([*args, "--student", str(learned_positions), "--teacher", str(pair[1]),
                 "--out", str(tmp_path / "r3")]) == 0
