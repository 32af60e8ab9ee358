"""Interruption: real `python -m opdlab distill` processes stopped by SIGINT/SIGTERM or killed by SIGKILL.

What is promised (docs/reliability.md):
- SIGINT / SIGTERM: the step in progress finishes, a checkpoint is written at that step, the
  process exits 130 / 143 with one stderr line naming the resume command.
- SIGKILL at any moment: every visible checkpoint is complete and loadable (a half-written one
  lives only in a hidden temporary folder), metrics.jsonl has at most a torn last line, and
  `--resume` continues from the newest checkpoint.
- A resumed run ends bit-identical to an uninterrupted one (same config, 1 thread), and its
  metrics.jsonl holds each step exactly once with no torn line.

Kill times are random (seed printed on failure; set FAULTS_SEED to replay); the short I/O
windows (checkpoint write, pruning, metrics append, final write) are also hit on purpose by
kill_driver.py, which kills the process from inside at that point.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, distill_args, logged_steps, spawn
from safetensors.torch import load_file

from opdlab.cli import main
from opdlab.distill.checkpoint import list_checkpoints
from opdlab.fileio import OUTPUT_MARKER

STEPS = 24
# Every step checkpoints (keep 2), so kills land in checkpoint writes and pruning often.
RUN = ["--save-dtype", "fp32", "--set", "run.save_every=1", "--set", "run.keep_checkpoints=2",
       "--set", "run.eval_every=8", "--set", "optim.schedule=cosine", "--set", "optim.warmup_steps=2"]
SEED = int(os.environ.get("FAULTS_SEED", time.time_ns() % 100_000))
DRIVER = Path(__file__).with_name("kill_driver.py")


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(distill_args(pair, out, STEPS, *RUN)) == 0
    return out


def wait_for(predicate, proc: subprocess.Popen | None, timeout: float = 90.0) -> bool:
    """Poll until `predicate()` is true; False if `proc` exits first (or on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s")


def newest_checkpoint(run: Path) -> int:
    found = list_checkpoints(run)
    return found[-1][0] if found else 0


def assert_consistent(run: Path, context: str) -> None:
    """What a crash may leave: complete visible files only; half-written ones only in hidden temporaries."""
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "opd", context
    json.loads((run / "run.json").read_text())  # written atomically: always whole
    logged_steps(run)  # a torn line may only be the last one
    root = run / "checkpoints"
    for entry in root.iterdir() if root.is_dir() else []:
        if entry.name.startswith("."):
            continue  # a temporary (being written, or being deleted): never read by opdlab
        assert re.fullmatch(r"step-\d+", entry.name), f"{context}: unexpected {entry}"
        step = int(entry.name.split("-")[1])
        state = json.loads((entry / "trainer_state/state.json").read_text())
        assert state["step"] == step, context
        load_file(str(entry / "trainer_state/master.safetensors"))
        load_file(str(entry / "model.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            torch.load(entry / "trainer_state" / name, weights_only=True)
    if (run / "final").exists():
        load_file(str(run / "final/model.safetensors"))


def assert_finished_like(run: Path, reference: Path, context: str) -> None:
    """The resumed run equals the uninterrupted one, and left nothing behind."""
    assert json.loads((run / "run.json").read_text())["status"] == "finished", context
    for name in ("final/model.safetensors", f"checkpoints/step-{STEPS}/trainer_state/master.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(run / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{context}: {name}: {k} differs from the uninterrupted run"
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n"), f"{context}: metrics.jsonl ends in a torn line"
    assert [json.loads(line)["step"] for line in text.splitlines()] == list(range(STEPS + 1)), context
    leftovers = [p for p in [*run.iterdir(), *(run / "checkpoints").iterdir()]
                 if p.name.startswith(".") and p.name != OUTPUT_MARKER]
    assert not leftovers, f"{context}: temporaries left after resume: {leftovers}"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_resume_is_bit_identical(pair, reference, tmp_path, capsys, sig, code):
    run = tmp_path / "run"
    proc = spawn(distill_args(pair, run, STEPS, *RUN, "--set", "run.save_every=0"))  # no periodic checkpoints
    try:
        wait_for(lambda: max(logged_steps(run), default=0) >= 2, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(rf"opdlab distill: stopped by {sig.name} after step (\d+) \(checkpoint saved\); "
                         rf"resume with: opdlab distill --resume (.+)", last)
    assert match, last
    step = int(match.group(1))
    assert Path(match.group(2)) == run and 2 <= step < STEPS
    # The checkpoint is at the step where it stopped (save_every=0 would otherwise write none before the end).
    assert [s for s, _ in list_checkpoints(run)] == [step]
    assert max(logged_steps(run)) == step and not (run / "final").exists()
    assert_consistent(run, sig.name)

    assert main(["distill", "--resume", str(run)]) == 0
    assert_finished_like(run, reference, f"{sig.name} at step {step}")


def _spawn_resume(run: Path, point: str | None = None, nth: int = 1) -> subprocess.Popen:
    """`opdlab distill --resume RUN`, plainly or under kill_driver.py with a planted kill."""
    return _spawn_driver(point, nth, ["distill", "--resume", str(run)]) if point else spawn(["distill", "--resume", str(run)])


def _spawn_driver(point: str, nth: int, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(DRIVER), point, str(nth), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def _random_kill(proc: subprocess.Popen, run: Path, rng: random.Random, log: list[str]) -> None:
    """SIGKILL `proc` at a random moment: 1-4 steps past its starting checkpoint, plus up to 0.3 s.

    Bounded by steps (not seconds) so a fast machine cannot finish the run before the kill.
    """
    start = max(newest_checkpoint(run), 1)
    target = start + rng.randint(1, 4)
    if wait_for(lambda: max(logged_steps(run), default=0) >= target, proc):
        time.sleep(rng.uniform(0.0, 0.3))
    proc.kill()
    proc.communicate(timeout=60)
    log.append(f"random kill (aim step {target}): rc {proc.returncode}, newest checkpoint {newest_checkpoint(run)}, "
               f"logged up to {max(logged_steps(run), default=0)}")


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(pair, reference, tmp_path):
    """Six SIGKILLs in a row, each process resuming the last one's run, then a resume to the end.

    Two land at random moments; four are planted inside the short I/O windows: a metrics append,
    a checkpoint write, the pruning of an old checkpoint, and the write of final/.
    """
    rng, log = random.Random(SEED), [f"FAULTS_SEED={SEED}"]
    run = tmp_path / "run"
    schedule = [("random", 0), ("metrics-append", 3), ("checkpoint-write", 2), ("random", 0), ("prune", 2),
                ("final-write", 1)]
    for i, (point, nth) in enumerate(schedule):
        if i == 0:
            proc = spawn(distill_args(pair, run, STEPS, *RUN))
        else:
            proc = _spawn_resume(run, None if point == "random" else point, nth)
        if point == "random":
            _random_kill(proc, run, rng, log)
        else:
            before = newest_checkpoint(run)
            _, err = proc.communicate(timeout=90)
            log.append(f"{point}: rc {proc.returncode}, checkpoint {before} -> {newest_checkpoint(run)}")
            assert proc.returncode == -signal.SIGKILL, f"{log}\n{err}"
        context = "; ".join(log)
        assert_consistent(run, context)
        if point == "checkpoint-write":
            # The half-written checkpoint is only in a hidden temporary; the newest visible one is whole.
            assert any(".tmp-" in p.name for p in (run / "checkpoints").iterdir()), context
        if point == "final-write":
            assert not (run / "final").exists() and newest_checkpoint(run) == STEPS, context
    assert main(["distill", "--resume", str(run)]) == 0, log
    assert_finished_like(run, reference, "; ".join(log))
