"""Huge pages for torch's large buffers are asked for by the streaming commands only, before torch loads."""

import os
import subprocess
import sys

import pytest

PROBE = "import sys; sys.argv = ['opdlab', sys.argv[1]]; import opdlab, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


@pytest.mark.parametrize("command, user, expected", [
    ("analyze", None, "1"), ("mask", None, "1"), ("compare", None, "1"),
    ("distill", None, "None"), ("analyze", "0", "0"),  # training untouched; the user's setting wins
])
def test_thp_setting(command, user, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user
    out = subprocess.run([sys.executable, "-c", PROBE, command], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == expected, out.stderr
