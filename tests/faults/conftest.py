"""Fixtures of the faults suite (its helpers live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import distill_args

from opdlab.cli import main
from opdlab.models.zoo import save_random_model


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(student, teacher): tiny random Llamas sharing the built-in character tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    return save_random_model(root / "student", seed=1), save_random_model(root / "teacher", seed=2, hidden_size=48)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, pair) -> Path:
    """A finished 2-step distill run of the tiny pair (tests copy it before changing anything)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(distill_args(pair, run, 2, "--set", "run.save_every=1", "--set", "run.keep_checkpoints=3")) == 0
    return run
