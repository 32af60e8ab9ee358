"""`opdlab experiment subnetwork | optimizers | mask-discovery`: the study's training experiments.

    opdlab experiment subnetwork --out runs/subnet                   # full OPD -> mask -> retrain (mask, random mask)
    opdlab experiment optimizers --out runs/optim --set "sgd_lrs=[0.1, 1.0]"
    opdlab experiment mask-discovery --out runs/discovery            # masks found early (recipes/mask_discovery.py)

subnetwork: (1) full OPD from the source; (2) the mask of coordinates it changed (|delta| > mask_atol
in mask_dtype); (3) retrain from the source with only that mask trainable, same data order, seed
and schedule; (4) the same with a random mask of identical per-tensor density, and (with
`top_update_mask`) with the coordinates of the largest fp32 update at that density. Writes
`subnetwork.json` (docs/formats.md) with accuracy, teacher-student KL, trainable fraction and how
close each retrained model ends to the full run.

optimizers: the same OPD objective with AdamW, SGD and SGD with momentum, each over its own
learning-rate sweep (best of each and the whole sweep are reported), plus the evidence for the
proposed mechanism: the spread of Adam's per-coordinate second moment under opd, sft and rl.
Writes `optimizers.json`.

Every arm is a normal run folder under `runs/`; with `--resume`, finished arms are kept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from opdlab.config import DistillConfig, ExperimentConfig, load_config
from opdlab.distill.checkpoint import list_checkpoints
from opdlab.errors import UserError
from opdlab.fileio import OUTPUT_MARKER, prepare_out_dir, read_json, relative_path, write_json
from opdlab.recipes.arms import EVAL_KEYS, final_eval, opd_arm, source_of, train_arm, trainable_fraction
from opdlab.recipes.mask_discovery import run_mask_discovery
from opdlab.subnet.evidence import second_moment_spread, weight_closeness
from opdlab.subnet.masks import extract_mask, load_mask, mask_metadata, random_like, save_mask, top_update_like

PRESETS: dict[str, dict[str, Any]] = {
    # `--preset`: overrides of ExperimentConfig, applied over --config and under --set (cli.to_config).
    # `opdlab demo` does not read this table: its experiments reuse the demo's own runs and are sized
    # by the demo's presets (opdlab.recipes.demo.PRESETS).
    "quick": {"train.run.steps": 40, "adamw_lrs": [3e-4, 1e-3], "sgd_lrs": [0.1, 1.0]},
    "default": {},
    "full": {"train.run.steps": 300, "adamw_lrs": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], "sgd_lrs": [1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]},
}


def experiment(cfg: ExperimentConfig) -> Path:
    """Run the experiment `cfg.kind` into `cfg.out`; return the JSON file it wrote."""
    out = Path(cfg.out)
    if cfg.resume and out.is_dir() and any(out.iterdir()):
        if not (out / OUTPUT_MARKER).is_file():  # resume writes runs/ and masks/ only into opdlab's own folder
            raise UserError(f"--resume --out {out}: not a folder opdlab wrote (no {OUTPUT_MARKER}); pass the folder "
                            "of an interrupted experiment, or a new --out without --resume")
    else:
        prepare_out_dir(out, cfg.overwrite, {"train.model.student": cfg.train.model.student,
                                             "train.model.teacher": cfg.train.model.teacher})
    if cfg.kind == "subnetwork":
        return run_subnetwork(cfg, out)
    if cfg.kind == "mask-discovery":
        return run_mask_discovery(cfg, out)
    return run_optimizers(cfg, out)


# ----------------------------------------------------------------------------- subnetwork


def run_subnetwork(cfg: ExperimentConfig, out: Path, progress: bool = True, full_run: Path | None = None,
                   arm_overrides: dict[str, Any] | None = None, after_arm: Callable[[Path], None] | None = None) -> Path:
    """Full OPD, then retraining with its mask and with a random mask of matched density.

    `full_run` reuses a finished OPD run made with `cfg.train` (the demo passes its main run);
    `arm_overrides` are applied to every masked arm (a study turns off their step-0 evaluation and
    takes the full run's instead); `after_arm(run_dir)` runs once a masked arm's figures are taken
    (a study deletes what it no longer needs).
    """
    started = time.time()
    train = opd_arm(cfg.train)
    train.run.save_dtype = "both"
    full = full_run if full_run is not None else train_arm(train, out / "runs" / "full", progress=progress)
    source = source_of(full)

    mask_file, random_file = out / "masks" / "subnetwork.safetensors", out / "masks" / "random.safetensors"
    if not mask_file.is_file():
        masks = extract_mask(source, full, atol=cfg.mask_atol, dtype=cfg.mask_dtype, progress=progress)
        save_mask(mask_file, masks, mask_metadata("extract", masks, base=str(source), tuned=str(full),
                                                  atol=cfg.mask_atol, dtype=cfg.mask_dtype), packed=True)
    else:
        masks = load_mask(mask_file)[0]
    if not random_file.is_file():
        control = random_like(masks, seed=cfg.train.run.seed)
        save_mask(random_file, control, mask_metadata("random_like", control, source=str(mask_file),
                                                      seed=cfg.train.run.seed), packed=True)
    arm_masks: list[tuple[str, Path | None]] = [("full", None), ("subnetwork", mask_file)]
    if cfg.top_update_mask:
        top_file = out / "masks" / "top_update.safetensors"
        if not top_file.is_file():
            top = top_update_like(source, full, masks, dtype="fp32", progress=progress)
            save_mask(top_file, top, mask_metadata("top_update_like", top, source=str(mask_file), base=str(source),
                                                   tuned=str(full), dtype="fp32"), packed=True)
        arm_masks.append(("top_update", top_file))
    arm_masks.append(("random", random_file))

    arms: dict[str, dict[str, Any]] = {}
    for name, mask in arm_masks:
        run_dir = full if mask is None else train_arm(train, out / "runs" / name,
                                                      {**(arm_overrides or {}), "optim.mask": str(mask)}, progress)
        row = {"run_dir": relative_path(run_dir, out), "mask": relative_path(mask, out) if mask else None,
               "trainable_fraction": trainable_fraction(mask)}
        row.update(final_eval(run_dir, start_from=full))
        if mask is not None:
            row["close_to_full"] = weight_closeness(source, full, run_dir)
            if after_arm is not None:
                after_arm(run_dir)
        arms[name] = row
    first = final_eval(full)
    result = {
        "schema": 1,
        "kind": "subnetwork",
        "num_eval": train.data.num_eval,
        "source": {"path": relative_path(source, out),
                   **{k: first[f"{k}_start"] for k in EVAL_KEYS if f"{k}_start" in first},
                   **({"per_example": first["per_example_start"]} if first.get("per_example_start") else {})},
        "mask": {"file": relative_path(mask_file, out), "atol": cfg.mask_atol, "dtype": cfg.mask_dtype,
                 "density": arms["subnetwork"]["trainable_fraction"]},
        "runs": arms,
        "seconds": round(time.time() - started, 1),
    }
    return write_json(out / "subnetwork.json", result)


# ----------------------------------------------------------------------------- optimizers


def _adam_state(run_dir: Path) -> tuple[dict, list[str]] | None:
    """The final AdamW state of a run and its parameter names, from the newest checkpoint."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    trainer = found[-1][1] / "trainer_state"
    state = torch.load(trainer / "optimizer.pt", weights_only=True)
    meta = read_json(trainer / "state.json", fix=f"delete {found[-1][1]} to use an older checkpoint")
    return state, list(meta.get("param_names", []))


def adam_evidence(run_dir: Path, out: Path) -> dict[str, Any] | None:
    """optimizers.json's "second_moment_cv" row for a finished AdamW run (None without Adam state); its
    run_dir is relative to `out`, the folder of the optimizers.json it goes into."""
    loaded = _adam_state(run_dir)
    if loaded is None:
        cached = run_dir / EVIDENCE_FILE  # written before the run's resumable state was deleted (save_adam_evidence)
        if not cached.is_file():
            return None
        return {**read_json(cached, fix=f"delete it and train {run_dir} again"), "run_dir": relative_path(run_dir, out)}
    spread = second_moment_spread(*loaded)
    lr = load_config(DistillConfig, run_dir / "config.yaml").optim.lr
    return {"run_dir": relative_path(run_dir, out), "lr": lr, "median_cv": spread["median"], "mean_cv": spread["mean"],
            "per_tensor": spread["per_tensor"]}


EVIDENCE_FILE = "adam_evidence.json"


def save_adam_evidence(run_dir: Path) -> None:
    """Keep a finished AdamW run's second-moment evidence beside it, so its optimizer state may be deleted."""
    row = adam_evidence(run_dir, run_dir)
    if row is not None and not (run_dir / EVIDENCE_FILE).is_file():
        write_json(run_dir / EVIDENCE_FILE, row)


def run_optimizers(
    cfg: ExperimentConfig, out: Path, progress: bool = True, evidence_runs: dict[str, Path] | None = None,
    reuse: dict[tuple[str, float], Path] | None = None, arm_overrides: dict[str, Any] | None = None,
    start_from: Path | None = None, after_arm: Callable[[Path], None] | None = None,
) -> Path:
    """AdamW vs SGD (with and without momentum), each over a learning-rate sweep, plus evidence.

    `evidence_runs` maps a method to a finished AdamW run of it to read the second moment from
    (the demo passes its main opd/sft/rl runs); other methods are trained at AdamW's best lr.
    `reuse` maps (optimizer, lr) to a finished run made with exactly that arm's config (the study's
    main run), which stands in for training the arm again. `arm_overrides` go to every trained arm;
    `start_from` supplies the step-0 evaluation of arms trained without one (`final_eval`);
    `after_arm(run_dir)` runs once a trained arm's row is taken.
    """
    started = time.time()
    train = opd_arm(cfg.train)
    arms = [("adamw", lr, {"optim.optimizer": "adamw"}) for lr in cfg.adamw_lrs]
    arms += [("sgd", lr, {"optim.optimizer": "sgd", "optim.momentum": 0.0}) for lr in cfg.sgd_lrs]
    arms += [("sgd_momentum", lr, {"optim.optimizer": "sgd", "optim.momentum": cfg.sgd_momentum})
             for lr in cfg.sgd_momentum_lrs or cfg.sgd_lrs]
    sweep = []
    for name, lr, extra in arms:
        if reuse and (name, lr) in reuse:  # a finished run of exactly this arm (the study's main run)
            run_dir = Path(reuse[(name, lr)])
        else:
            run_dir = train_arm(train, out / "runs" / f"{name}-lr{lr:g}",
                                {**(arm_overrides or {}), **extra, "optim.lr": lr}, progress)
        row = {"optimizer": name, "lr": lr, "run_dir": relative_path(run_dir, out)}
        row.update(final_eval(run_dir, start_from=start_from))
        if after_arm is not None and not (reuse and (name, lr) in reuse):
            after_arm(run_dir)
        sweep.append(row)
    best: dict[str, Any] = {}
    for name in ("adamw", "sgd", "sgd_momentum"):
        rows = [r for r in sweep if r["optimizer"] == name]
        # Best = highest final accuracy, ties broken by lower teacher-student KL.
        best[name] = max(rows, key=lambda r: ((r["accuracy"] or 0.0), -(r["reverse_kl"] or 0.0)))

    # Evidence: spread of Adam's second moment under each method at AdamW's best learning rate.
    evidence: dict[str, Any] = {}
    best_lr = best["adamw"]["lr"]
    for method in cfg.evidence_methods:
        if evidence_runs and method in evidence_runs:
            run_dir = Path(evidence_runs[method])
        elif method == "opd":
            run_dir = out / best["adamw"]["run_dir"]
        else:
            run_dir = train_arm(train, out / "runs" / f"evidence-{method}", {
                **(arm_overrides or {}), "method": method, "optim.optimizer": "adamw", "optim.lr": best_lr}, progress)
        row = adam_evidence(run_dir, out)
        if row is not None:
            evidence[method] = row
    result = {"schema": 1, "kind": "optimizers", "num_eval": train.data.num_eval, "sweep": sweep, "best": best,
              "second_moment_cv": evidence, "seconds": round(time.time() - started, 1)}
    return write_json(out / "optimizers.json", result)
