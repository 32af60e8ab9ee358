"""An interrupted run, resumed with `--resume`, ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdlab.cli import main
from opdlab.distill import checkpoint as ckpt_module
from opdlab.models.zoo import save_random_model

STEPS, INTERRUPT_AFTER = 4, 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return save_random_model(root / "student", seed=1), save_random_model(root / "teacher", seed=2, hidden_size=48)


def args(pair, out: Path, method: str) -> list[str]:
    # Cosine schedule with warmup, AdamW and sampling at temperature 1: every piece of trainer state matters.
    return ["distill", "--student", str(pair[0]), "--teacher", str(pair[1]), "--task", "addition",
            "--method", method, "--steps", str(STEPS), "--out", str(out), "--lr", "3e-3", "--save-dtype", "both",
            "--set", "optim.schedule=cosine", "--set", "optim.warmup_steps=1", "--set", "optim.weight_decay=0.01",
            "--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=2",
            "--set", "rollout.max_new_tokens=6", "--set", "data.num_eval=4", "--set", "run.eval_every=1",
            "--set", "run.save_every=1", "--set", "run.keep_checkpoints=2", "--set", "run.threads=1"]


@pytest.mark.parametrize("method", ["opd", "rl"])
def test_resume_is_bit_identical(pair, tmp_path, monkeypatch, method, capsys):
    full = tmp_path / "full"
    assert main(args(pair, full, method)) == 0

    # Interrupt right after the step-2 checkpoint is on disk, as a crash or Ctrl-C would.
    original = ckpt_module.save_checkpoint

    def crash_after(run_dir, step, *a, **k):
        path = original(run_dir, step, *a, **k)
        if step == INTERRUPT_AFTER:
            raise KeyboardInterrupt
        return path

    broken = tmp_path / "broken"
    monkeypatch.setattr(ckpt_module, "save_checkpoint", crash_after)
    assert main(args(pair, broken, method)) == 130
    monkeypatch.setattr(ckpt_module, "save_checkpoint", original)
    assert json.loads((broken / "run.json").read_text())["status"] == "running"
    assert not (broken / "final").exists()

    assert main(["distill", "--resume", str(broken)]) == 0
    assert json.loads((broken / "run.json").read_text())["status"] == "finished"
    for name in (f"checkpoints/step-{STEPS}/trainer_state/master.safetensors", "final-fp32/model.safetensors",
                 "final/model.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(broken / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"
    # metrics.jsonl holds each step once, and the resumed steps log what the full run logged.
    rows_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_resumed = [json.loads(x) for x in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_resumed] == list(range(STEPS + 1))
    for a, b in zip(rows_full, rows_resumed):
        assert {k: v for k, v in a.items() if not k.startswith("time/") and k != "train/tokens_per_s"} == \
               {k: v for k, v in b.items() if not k.startswith("time/") and k != "train/tokens_per_s"}

    # Resuming a finished run is a no-op that returns the run folder.
    capsys.readouterr()
    assert main(["distill", "--resume", str(broken)]) == 0
    assert capsys.readouterr().out.strip() == str(broken)


def test_resume_without_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: opd\n")
    assert main(["distill", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint" in err
