"""Helpers of the faults suite: CLI runners, subprocess spawning and the one-line-error check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from opdlab.cli import main

REPO = Path(__file__).resolve().parents[2]

# Small enough that a step takes ~0.1 s on a busy core; every fault test trains with these.
SMALL = ["--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=2",
         "--set", "rollout.max_new_tokens=6", "--set", "data.num_eval=4", "--set", "run.threads=1"]


def distill_args(pair: tuple[Path, Path], out: Path, steps: int, *extra: str) -> list[str]:
    return ["distill", "--student", str(pair[0]), "--teacher", str(pair[1]), "--task", "addition",
            "--steps", str(steps), "--out", str(out), "--lr", "3e-3", *SMALL, *extra]


def cli_error(argv: list[str], capsys, code: int = 2) -> str:
    """Run the CLI in-process, expect exit `code`, no traceback and exactly one error line; return it."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, f"exit {rc}, stderr:\n{err}"
    assert "[y/N]" not in out + err, "an interactive prompt was shown (trust_remote_code left unset?)"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"opdlab {argv[0]}:")]
    assert len(lines) == 1, err
    # Nothing else on stderr but progress bars and warnings (lines that carry a progress bar's '|' or 'Warning').
    others = [ln for ln in err.splitlines() if ln.strip() and ln not in lines and "|" not in ln and "Warning" not in ln
              and "warnings.warn" not in ln]
    assert not others, err
    return lines[0]


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """`python -m opdlab ARGV` as a real subprocess (stdout/stderr piped)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "opdlab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=kwargs.pop("cwd", REPO), **kwargs)


def logged_steps(run: Path) -> list[int]:
    """Steps in metrics.jsonl, tolerating a torn last line (as `fileio.read_jsonl` does)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    steps = []
    for i, line in enumerate(lines):
        try:
            steps.append(int(json.loads(line)["step"]))
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"{path}: torn line {i + 1} is not the last one"
    return steps
