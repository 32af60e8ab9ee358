"""Parts every training experiment shares: one arm's run, its held-out figures, and its source.

    run_dir = train_arm(base, out / "runs" / "random", {"optim.mask": "masks/random.safetensors"})
    row = final_eval(run_dir, start_from=full_run)     # accuracy, reverse KL, answer log-likelihood (+ SEs)
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from opdlab.config import DistillConfig, load_config, to_dict
from opdlab.distill.checkpoint import finished_step, list_checkpoints, read_run_info
from opdlab.errors import UserError
from opdlab.distill.logging import EVALS_DIR
from opdlab.fileio import read_json, read_jsonl
from opdlab.recipes.distill import distill
from opdlab.subnet.masks import density, load_mask



def train_arm(base: DistillConfig, run_dir: Path, overrides: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """One training run of an experiment: `base` plus dotted `overrides`, into `run_dir`.

    A finished run already in `run_dir` (run.json status finished, final/ present) is kept; one with
    a complete checkpoint is resumed from it; only an arm with nothing to continue from starts again.
    """
    cfg = load_config(DistillConfig, None, _flatten(to_dict(base)) | (overrides or {}) | {"out": str(run_dir)})
    if finished_step(run_dir) == cfg.run.steps:
        return run_dir
    if (run_dir / "config.yaml").is_file() and list_checkpoints(run_dir):
        # Any failure of the resumed arm propagates: restarting it would delete its checkpoints.
        return distill(dataclasses.replace(cfg, resume=str(run_dir)), progress=progress)
    # Nothing to continue from: start the arm again.
    return distill(dataclasses.replace(cfg, overwrite=True), progress=progress)


def opd_arm(train: DistillConfig) -> DistillConfig:
    """A copy of an experiment's base run as OPD: opsd (OPD with its own teacher) stays opsd, others become opd."""
    arm = copy.deepcopy(train)
    arm.method = "opsd" if arm.method == "opsd" else "opd"
    return arm


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _eval_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/accuracy" in r or "eval/reverse_kl" in r]
    if not rows:
        raise UserError(f"{run_dir}/metrics.jsonl: no evaluation rows; was the run interrupted before step 0 finished?")
    return rows


def final_eval(run_dir: Path, start_from: Path | None = None) -> dict[str, Any]:
    """The first and last evaluation of a run: accuracy, teacher-student reverse KL and the answer
    log-likelihood, each with its standard error where the run logged one (`_start`: step 0).

    A run trained with `run.eval_start` off has no step-0 row: its `_start` values are those of
    `start_from` (a run from the same source on the same held-out prompts), else absent.
    """
    rows = _eval_rows(run_dir)
    first, last = rows[0], rows[-1]
    first_dir: Path | None = run_dir
    if first.get("step") != 0:
        first, first_dir = (_eval_rows(start_from)[0], start_from) if start_from is not None else ({}, None)
    out: dict[str, Any] = {}
    for key in EVAL_KEYS:
        out[key] = last.get(f"eval/{key}")
        out[f"{key}_start"] = first.get(f"eval/{key}")
    out["step"] = last.get("step")
    # per-prompt values (evals/step-N.json) for paired comparisons between runs on the same prompts
    out["per_example"] = per_example(run_dir, last.get("step"))
    out["per_example_start"] = per_example(first_dir, 0) if first_dir is not None else None
    return {k: v for k, v in out.items() if v is not None or k in ("accuracy", "reverse_kl", "accuracy_start",
                                                                      "reverse_kl_start", "step")}


def per_example(run_dir: Path, step: Any) -> dict[str, list[float]] | None:
    """A run's per-prompt evaluation at `step` (evals/step-N.json), or None when it logged none."""
    path = run_dir / EVALS_DIR / f"step-{step}.json"
    if not isinstance(step, int) or not path.is_file():
        return None
    data = read_json(path, fix="delete it (the comparisons then use unpaired standard errors)")
    return {k: v for k, v in data.items() if isinstance(v, list)}


# metrics.jsonl eval keys (without "eval/") that experiment rows carry, at the end and at step 0
EVAL_KEYS = ("accuracy", "reverse_kl", "reverse_kl_se", "answer_logp", "answer_logp_se", "num_examples")


def source_of(run_dir: Path) -> Path:
    """The student source a run started from (recorded in run.json)."""
    info = read_run_info(run_dir)
    for key in ("student", "student_path", "source"):
        if isinstance(info.get(key), str) and info[key]:
            return Path(info[key])
    raise UserError(f"{run_dir / 'run.json'}: does not record the student source path (a 'student' string); "
                    "restore it, or train this arm again")


def trainable_fraction(mask_file: Path | None) -> float:
    if mask_file is None:
        return 1.0

    return density(load_mask(mask_file)[0])
