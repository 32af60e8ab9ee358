"""Config files and CLI values that used to end in a traceback (or worse): one line, exit 2.

YAML alias bombs (a few hundred bytes that expand to millions of values: memory grew without bound
while the error message was built), keys containing newlines (the error spanned two lines and could
be forged), seeds beyond 64 bits, a negative AdamW epsilon, and learning rates so large that the
update overflows inside the optimizer or leaves non-finite weights.
"""

from __future__ import annotations

import time

import pytest
from helpers import cli_error, distill_args

from opdlab.cli import main
from opdlab.distill.checkpoint import list_checkpoints


def bomb(levels: int = 7, width: int = 9) -> str:
    """YAML flow text of `levels` nested anchors, each `width` references to the one before: width**levels values."""
    parts = ["&a0 [" + ", ".join(["1"] * width) + "]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("where", ["file", "set"])
def test_yaml_alias_bomb_is_refused_quickly(pair, tmp_path, capsys, where):
    text = bomb()
    assert len(text) < 400  # ~4.8 million values once expanded
    if where == "file":
        cfg = tmp_path / "bomb.yaml"
        cfg.write_text(f"run:\n  steps: {text}\n")
        argv = ["distill", "--config", str(cfg), "--out", str(tmp_path / "run")]
    else:
        argv = distill_args(pair, tmp_path / "run", 1, "--set", f"run.steps={text}")
    started = time.perf_counter()
    line = cli_error(argv, capsys)
    assert time.perf_counter() - started < 20
    assert len(line) < 600 and "alias" in line, line[:600]


def test_keys_with_newlines_stay_on_one_line(pair, tmp_path, capsys):
    cfg = tmp_path / "keys.yaml"
    cfg.write_text('optim:\n  "lr\\nopdlab distill: error: forged": 1\n')
    line = cli_error(["distill", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert "lr\\nopdlab distill" in line, line  # shown escaped, on the one error line
    line = cli_error(distill_args(pair, tmp_path / "run2", 1, "--set", "optim.lr\nx=1"), capsys)
    assert "lr\\nx" in line, line


@pytest.mark.parametrize("argv_tail", [["--seed", str(2**64)], ["--seed", str(-(2**63) - 1)],
                                       ["--set", "run.seed=99999999999999999999"]])
def test_seeds_beyond_64_bits(pair, tmp_path, capsys, argv_tail):
    line = cli_error(distill_args(pair, tmp_path / "run", 1, *argv_tail), capsys)
    assert "seed" in line and "64 bits" in line, line


def test_large_seeds_within_64_bits_work_for_random_masks(pair, tmp_path, capsys):
    m = tmp_path / "m.safetensors"
    assert main(["mask", str(pair[0]), str(pair[0]), "--out", str(m)]) == 0
    assert main(["mask", "--random-like", str(m), "--seed", str(2**64 - 1), "--out", str(tmp_path / "r.safetensors")]) == 0
    line = cli_error(["mask", "--random-like", str(m), "--seed", str(2**64), "--out", str(tmp_path / "s.safetensors")],
                     capsys)
    assert "seed" in line and "64 bits" in line, line


def test_negative_adam_epsilon(pair, tmp_path, capsys):
    line = cli_error(distill_args(pair, tmp_path / "run", 1, "--set", "optim.eps=-1"), capsys)
    assert "optim.eps" in line, line


@pytest.mark.parametrize("args", [["--lr", "1e38"], ["--optimizer", "sgd", "--lr", "1e20"], ["--lr", "1e300"]])
def test_learning_rates_that_overflow(pair, tmp_path, capsys, args):
    run = tmp_path / "run"
    line = cli_error(distill_args(pair, run, 3, "--set", "run.save_every=1", *args), capsys)
    assert "optim.lr" in line and "step 1" in line, line
    assert list_checkpoints(run) == []  # the broken weights of step 1 were not saved
