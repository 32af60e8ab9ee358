"""Fixtures of the faults suite (its helpers live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opdlab.models.zoo import save_random_model


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(student, teacher): tiny random Llamas sharing the built-in character tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    return save_random_model(root / "student", seed=1), save_random_model(root / "teacher", seed=2, hidden_size=48)

