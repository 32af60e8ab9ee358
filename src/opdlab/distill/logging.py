"""One logging path: a flat dict per step -> metrics.jsonl, optional TensorBoard, the progress bar.

    log = MetricsLog(run_dir, tensorboard=False, total_steps=100, first_step=0)
    log.write({"step": 3, "train/loss": 0.41, "train/reverse_kl": 0.39, ...})
    log.close()

Key names are stable (the report reads them): `train/loss`, `train/reverse_kl`, `train/reward`,
`train/grad_norm`, `train/lr`, `train/completion_tokens`, `train/tokens_per_s`, `time/rollout_s`,
`time/score_s`, `time/update_s`, and on evaluation steps `eval/accuracy`, `eval/reverse_kl`
(and `eval/accuracy/<task>` for a task mixture).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from opdlab.errors import UserError
from opdlab.fileio import append_jsonl, read_jsonl, write_json, write_text

METRICS_FILE = "metrics.jsonl"
EXAMPLES_KEY = "eval/examples"  # an evaluation's per-prompt values: written to evals/step-N.json, not metrics.jsonl
EVALS_DIR = "evals"


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop rows after `last_step` (logged by an interrupted run after its last checkpoint)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    import json

    rows = read_jsonl(path, fix="restore the file, or delete that line and resume again")
    for number, r in enumerate(rows, start=1):
        if isinstance(r.get("step", 0), bool) or not isinstance(r.get("step", 0), int):
            raise UserError(f"{path}: row {number}: 'step' must be an integer, got {r.get('step')!r}; "
                            "restore the file, or delete that row and resume again")
    kept = [r for r in rows if r.get("step", 0) <= last_step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def require_tensorboard() -> None:
    """Fail early (before any model loads) when the TensorBoard sink is asked for but missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("run.tensorboard is on but tensorboard is not installed; "
                        "pip install 'opdlab[tensorboard]' or drop the setting") from None


class MetricsLog:
    """Appends step dicts to metrics.jsonl, mirrors them to TensorBoard, and drives a tqdm bar."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, total_steps: int, first_step: int, progress: bool = True):
        self.path = run_dir / METRICS_FILE
        self.tb = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc="distill", unit="step", dynamic_ncols=True)

    def write(self, row: dict[str, Any]) -> None:
        """Log one flat dict (it must have "step"); eval-only rows do not advance the bar."""
        step = int(row["step"])
        examples = row.pop(EXAMPLES_KEY, None)
        if examples is not None:
            write_json(self.path.parent / EVALS_DIR / f"step-{step}.json", {"schema": 1, "step": step, **examples})
        append_jsonl(self.path, row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.bar is not None:
            shown = {}
            for key, label in (("train/loss", "loss"), ("train/reverse_kl", "kl"), ("train/tokens_per_s", "tok/s"),
                               ("eval/accuracy", "eval_acc")):
                if key in row and row[key] is not None:
                    value = row[key]
                    shown[label] = f"{value:.0f}" if label == "tok/s" else f"{value:.4g}"
            if shown:
                self.bar.set_postfix(shown, refresh=False)
            if "train/loss" in row:
                self.bar.update(step - self.bar.n)
            else:
                self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
