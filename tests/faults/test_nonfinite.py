"""Numerical faults: a NaN/inf loss or gradient stops the run (or skips the batch) before it reaches the weights.

Two ways to make one: a hook that poisons one step's gradient (wrapping the trainer's
`accumulate_gradients` from the test, so src/ has no test hooks), and a poisoned input — a
teacher whose output head holds NaN, so every loss is NaN from step 1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import cli_error, distill_args
from safetensors.torch import load_file, save_file

from opdlab.cli import main
from opdlab.distill import train as train_module
from opdlab.distill.guards import nonfinite_reason

BAD_STEP = 3
RUN = ["--save-dtype", "fp32", "--set", "run.save_every=1", "--set", "run.keep_checkpoints=5",
       "--set", "optim.weight_decay=0.1"]  # weight decay would move the weights on a skipped step if it ran


def poison_step(monkeypatch, step: int, where: str) -> None:
    """Make step `step`'s loss (where='loss') or one gradient (where='grad') non-finite."""
    original = train_module.accumulate_gradients
    calls = {"n": 0}

    def poisoned(models, *args, **kwargs):
        loss, kl, t_score, t_update = original(models, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            if where == "loss":
                loss = float("nan")
            else:
                next(p for p in models.student.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return loss, kl, t_score, t_update

    monkeypatch.setattr(train_module, "accumulate_gradients", poisoned)


def master(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"checkpoints/step-{step}/trainer_state/master.safetensors"))


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_stops_with_one_line_naming_the_step(pair, tmp_path, monkeypatch, capsys, where):
    run = tmp_path / "run"
    poison_step(monkeypatch, BAD_STEP, where)
    line = cli_error(distill_args(pair, run, 5, *RUN), capsys)
    what = "the loss is nan" if where == "loss" else "the gradient norm is inf"
    assert f"step {BAD_STEP}: {what}" in line and f"checkpoints/step-{BAD_STEP - 1}" in line
    assert "--resume" in line and "run.on_nonfinite=skip" in line
    # The last good checkpoint is kept; nothing from the bad step or later was written.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s}" for s in range(1, BAD_STEP)]
    assert not (run / "final").exists()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(BAD_STEP))

    # The run resumes from the last good checkpoint once the fault is gone.
    monkeypatch.undo()
    assert main(["distill", "--resume", str(run)]) == 0
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_skip_policy_drops_the_batch_and_logs_it(pair, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_step(monkeypatch, BAD_STEP, "grad")
    assert main(distill_args(pair, run, 5, *RUN, "--set", "run.on_nonfinite=skip")) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert [r.get("train/skipped_nonfinite") for r in rows[1:]] == [None, None, 1, None, None]
    # No optimizer step at the bad step: not even weight decay moved a weight...
    before, after = master(run, BAD_STEP - 1), master(run, BAD_STEP)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...and the steps after it trained on, with finite weights.
    final = master(run, 5)
    assert any(not torch.equal(after[k], final[k]) for k in after)
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.fixture()
def poisoned_teacher(pair, tmp_path) -> Path:
    """A copy of the teacher whose output head is NaN: a poisoned input, no hook."""
    import shutil

    teacher = tmp_path / "teacher-nan"
    shutil.copytree(pair[1], teacher)
    weights = load_file(str(teacher / "model.safetensors"))
    key = next(k for k in weights if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    return teacher


def test_poisoned_teacher_stops_at_step_one(pair, poisoned_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    line = cli_error(distill_args((pair[0], poisoned_teacher), run, 3, *RUN), capsys)
    assert re.search(r"step 1: the loss is nan.*last good checkpoint \(none", line), line
    assert not (run / "checkpoints").exists() and not (run / "final").exists()


def test_poisoned_teacher_with_skip_leaves_the_student_unchanged(pair, poisoned_teacher, tmp_path):
    run = tmp_path / "run"
    assert main(distill_args((pair[0], poisoned_teacher), run, 3, *RUN, "--set", "run.on_nonfinite=skip")) == 0
    start = load_file(str(pair[0] / "model.safetensors"))
    final = load_file(str(run / "final/model.safetensors"))
    assert start.keys() == final.keys() and all(torch.equal(start[k], final[k]) for k in start)


def test_nonfinite_reason_names_what_is_wrong():
    assert nonfinite_reason(0.5, torch.tensor(2.0)) is None
    assert nonfinite_reason(float("nan"), 1.0) == "the loss is nan"
    assert nonfinite_reason(float("-inf"), 1.0) == "the loss is -inf"
    assert nonfinite_reason(1.0, torch.tensor(float("inf"))) == "the gradient norm is inf"
