"""`opdlab study`: the whole study on one pair, resumably, in one folder.

    opdlab study --student S --teacher T --prompts P --out DIR        # method opd, a separate teacher
    opdlab study --student S --task chat-subtraction --method opsd --out DIR   # self-distillation
    opdlab study --config study.yaml --quick --out DIR                 # YAML chooses arms, budgets, grids
    opdlab study ... --resume                                          # finished stages are kept

From one source student, in `--out` (stage names in brackets; `demo.json` lists those done):
  runs/<m>, runs/<m>-seed<k>   the main run (m = opd or opsd, AdamW), and the same at other seeds [<m>, <m>-seed<k>]
  runs/sft, runs/rl            SFT on the teacher's own completions (opsd: the privileged teacher's) and
                               GRPO on the task's exact reward, same prompts, steps and schedule [sft, rl]
  analysis/<run>               what each run changed, bf16; analysis/<m>-fp32 the fp32 twin [analysis-*]
  compare/<a>-vs-<b>           update-mask overlaps against chance [compare-*]
  experiments/subnetwork       retraining from the source on the main run's bf16 mask (|Δ| > mask_atol), on
                               the fp32 largest-update coordinates at the same per-tensor density, and on
                               a random mask of that density [subnetwork]
  experiments/mask_discovery   (arm mask_discovery) retraining on the main run's changed mask after 10/25/50 % of
                               its steps, on the source's lowest-|W| coordinates, at the final mask's density;
                               the final and random arms are the subnetwork arm's [mask-discovery]
  experiments/optimizers       AdamW vs plain SGD vs SGD with momentum, each over its lr grid [optimizers]
  sweep/lr_sweep.json          (arm lr_sweep) the AdamW arms analysed: sparsity against step size [lr-sweep]
  report/report.html           findings with the study's reported numbers beside them [report]

`opdlab demo`, `demo --real` and `demo --vlm` are presets of this pipeline (recipes/demo.py): they
choose a pair, a task and a budget and call `run_study`. Each training arm is a plain run folder
made by `opdlab distill`, so any of them can also be run by hand under torchrun
(`opdlab distill --nproc N --config runs/<arm>/config.yaml`, docs/scale-out.md) and the study
resumed to pick it up.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from opdlab.config import CompareConfig, DistillConfig, ExperimentConfig, StudyConfig, load_config
from opdlab.distill.checkpoint import read_run_info, write_run_info
from opdlab.errors import UserError
from opdlab.fileio import relative_path, write_json
from opdlab.recipes.compare import compare
from opdlab.recipes.demo_stages import analyze_pair, analyze_runs, open_manifest, write_report
from opdlab.recipes.arms import final_eval, source_of, train_arm
from opdlab.recipes.experiment import run_optimizers, run_subnetwork, save_adam_evidence
from opdlab.recipes.mask_discovery import UNTRACKED, run_mask_discovery

# `--preset`: overrides of StudyConfig, applied over --config and under flags and --set (cli.to_config).
# Sized for a GPU and a 1-4B pair at the study's step size (AdamW 1e-6); the demos use their own
# budgets (recipes/demo.py).
_STUDY_LIKE = {"train.optim.optimizer": "adamw", "train.optim.lr": 1e-6, "train.optim.weight_decay": 0.0,
               "train.run.save_dtype": "both", "train.run.eval_every": 0, "train.run.keep_checkpoints": 1}
PRESETS: dict[str, dict[str, Any]] = {
    "quick": _STUDY_LIKE | {"train.run.steps": 20, "train.data.num_eval": 64, "seeds": 1},
    "default": _STUDY_LIKE | {"train.run.steps": 200, "train.data.num_eval": 256},
    "full": _STUDY_LIKE | {"train.run.steps": 1000, "train.data.num_eval": 512, "seeds": 3,
                           "adamw_lrs": [3e-7, 1e-6, 3e-6], "sgd_lrs": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
                           "sgd_momentum_lrs": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]},
}

# Prior seconds per unit of plan weight, before a stage of that class has run (the terminal's
# estimate of the time left corrects itself after the first stage of each class).
PRIOR_S = {"train": 2.0, "analysis": 10.0, "compare": 10.0, "sweep": 10.0, "report": 5.0}


def study(cfg: StudyConfig) -> Path:
    """Run the study of `cfg` into `cfg.out`; return the report's path."""
    return run_study(cfg, f"study-{cfg.preset or 'default'}")


def main_config(cfg: StudyConfig) -> DistillConfig:
    """The main run: `cfg.train` with the study's student, teacher, prompts, task and method."""
    base = copy.deepcopy(cfg.train)
    for value, section, name in ((cfg.student, base.model, "student"), (cfg.teacher, base.model, "teacher"),
                                 (cfg.prompts, base.data, "prompts"), (cfg.task, base.data, "task")):
        if value is not None:
            setattr(section, name, value)
    if cfg.method is not None:
        base.method = cfg.method
    if base.method not in ("opd", "opsd"):
        raise UserError(f"train.method {base.method!r}: a study's main run is opd or opsd (sft and rl are its baselines)")
    if base.method == "opd" and base.model.student and not base.model.teacher:
        raise UserError("--student without --teacher: method opd needs a teacher (or use --method opsd, the "
                        "student's own source shown privileged context)")
    if base.run.save_dtype != "both":
        base.run.save_dtype = "both"  # the fp32 analysis and the fp32 mask read final-fp32/
    discovering = "mask_discovery" in cfg.arms
    every = cfg.track_update_every or (max(1, base.run.steps // 10) if discovering else 0)
    if every and not base.run.track_update_every:
        base.run.track_update_every = every
    if discovering:
        base.run.save_update_masks = True  # the early masks are the main run's snapshots
    return base


def stage_names(cfg: StudyConfig, main: str) -> list[str]:
    """The training runs of the study, main first."""
    names = [main] + ([f"{main}-seed{s}" for s in range(1, cfg.seeds)] if "seeds" in cfg.arms else [])
    return names + [m for m in ("sft", "rl") if m in cfg.arms]


def arm_common(cfg: StudyConfig) -> dict[str, Any]:
    """Overrides every arm but the main run shares: without the step-0 evaluation when it is shared, and
    without mask snapshots (only the main run's are read)."""
    return ({"run.eval_start": False} if cfg.share_start_eval else {}) | {"run.save_update_masks": False}


def experiment_common(cfg: StudyConfig) -> dict[str, Any]:
    """Overrides of every experiment arm (subnetwork, optimizers, mask discovery): no telemetry either."""
    return arm_common(cfg) | UNTRACKED


def run_overrides(cfg: StudyConfig, base: DistillConfig, name: str, main: str) -> dict[str, Any]:
    """Dotted overrides of the main run's config for one training arm."""
    if name == main:
        return {}
    common = arm_common(cfg)
    if name.startswith(f"{main}-seed"):
        return {**common, "run.seed": int(name.rsplit("seed", 1)[1])}
    # opsd: the teacher is the privileged source, so SFT trains on the privileged teacher's own completions,
    # and both baselines measure their evaluation KL against it
    privileged = {"data.privileged_teacher": True} if base.method == "opsd" else {}
    if name == "sft":
        return {**common, **privileged, "method": "sft"}
    if name == "rl":
        return {**common, **privileged, "method": "rl", "rollout.samples_per_prompt": cfg.rl_samples_per_prompt}
    raise ValueError(name)


def experiment_config(cfg: StudyConfig, base: DistillConfig) -> ExperimentConfig:
    """The subnetwork and optimizer experiments' config: every arm is the main run with one change."""
    exp = load_config(ExperimentConfig, None, {
        "mask_atol": cfg.mask_atol, "mask_dtype": cfg.mask_dtype, "top_update_mask": cfg.top_update_mask,
        "adamw_lrs": cfg.adamw_lrs, "sgd_lrs": cfg.sgd_lrs, "sgd_momentum_lrs": cfg.sgd_momentum_lrs,
        "sgd_momentum": cfg.sgd_momentum, "discovery_fractions": cfg.discovery_fractions})
    exp.train = copy.deepcopy(base)
    return exp


def plan(cfg: StudyConfig, base: DistillConfig, main: str, runs: list[str]) -> dict[str, tuple[str, float]]:
    """Every stage of the study with its kind and weight (training steps, or 1), for the time-left estimate."""
    steps = float(base.run.steps)
    stages: dict[str, tuple[str, float]] = {name: ("run", steps * (2.0 if name == "rl" else 1.0)) for name in runs}
    for name in runs:
        stages[f"analysis-{name}"] = ("analysis", 1.0)
    stages[f"analysis-{main}-fp32"] = ("analysis", 1.0)
    for a, b in compare_pairs(cfg, main, runs):
        stages[f"compare-{a}-vs-{b}"] = ("compare", 1.0)
    if "subnetwork" in cfg.arms:
        stages["subnetwork"] = ("experiment", steps * (3 if cfg.top_update_mask else 2))
    if "mask_discovery" in cfg.arms:
        stages["mask-discovery"] = ("experiment", steps * (len(cfg.discovery_fractions) + 1))
    if "optimizers" in cfg.arms:
        extra = [lr for lr in cfg.adamw_lrs if lr != base.optim.lr]
        stages["optimizers"] = ("experiment", steps * (len(extra) + len(cfg.sgd_lrs) + len(cfg.sgd_momentum_lrs)))
        if "lr_sweep" in cfg.arms:
            stages["lr-sweep"] = ("sweep", float(len(cfg.adamw_lrs)))
    stages["report"] = ("report", 1.0)
    return stages


def compare_pairs(cfg: StudyConfig, main: str, runs: list[str]) -> list[tuple[str, str]]:
    if "compare" not in cfg.arms:
        return []
    pairs = [(main, "rl"), (main, "sft"), ("sft", "rl")] + [(main, r) for r in runs if r.startswith(f"{main}-seed")]
    return [(a, b) for a, b in pairs if a in runs and b in runs]


def run_study(cfg: StudyConfig, label: str, estimate: str = "", announce: str = "") -> Path:
    """The study pipeline (what `opdlab study` and every demo preset run); returns report.html's path.

    `label` is the manifest's preset name; `estimate` a line on the expected wall time.
    """
    base = main_config(cfg)
    main = base.method
    out = Path(cfg.out)
    manifest = open_manifest(out, label, cfg.resume, cfg.overwrite,
                             {"--student": cfg.student, "--teacher": cfg.teacher, "--prompts": cfg.prompts})
    names = stage_names(cfg, main)
    manifest.plan(plan(cfg, base, main, names), PRIOR_S)
    print(announce or f"opdlab study ({label}, method {main}) -> {out}", flush=True)
    if estimate:
        print(f"  {estimate}; each stage prints its time and the time left, training bars their ETA", flush=True)

    # ---- 1. the main run, its other seeds and the baselines, from one source with matched budgets
    runs: dict[str, Path] = {}
    for name in names:
        run_dir = out / "runs" / name
        runs[name] = run_dir
        manifest.run(name, "run", run_dir,
                     lambda n=name, d=run_dir: train_arm(base, d, run_overrides(cfg, base, n, main)), out)
        if cfg.prune:
            save_adam_evidence(run_dir)  # the optimizer comparison reads it later
            prune_run(run_dir, keep_fp32=name == main)
    source = source_of(runs[main])

    # ---- 2. what each run changed (bf16), and the main run in fp32
    analyze_runs(manifest, source, runs, out, main)

    # ---- 3. do different runs change the same coordinates?
    for a, b in compare_pairs(cfg, main, names):
        dest = out / "compare" / f"{a}-vs-{b}"
        manifest.run(f"compare-{a}-vs-{b}", "compare", dest, lambda a=a, b=b, d=dest: compare(load_config(
            CompareConfig, None, {"base": str(source), "run_a": str(runs[a]), "run_b": str(runs[b]), "out": str(d),
                                  "overwrite": True})), out)

    # ---- 4. subnetwork retraining and the optimizer comparison
    experiment = experiment_config(cfg, base)
    if "subnetwork" in cfg.arms:
        sub_dir = out / "experiments" / "subnetwork"
        manifest.run("subnetwork", "experiment", sub_dir, lambda: run_subnetwork(
            experiment, sub_dir, full_run=runs[main], arm_overrides=experiment_common(cfg),
            after_arm=prune_arm if cfg.prune else None), out)
    if "mask_discovery" in cfg.arms:
        md_dir, sub = out / "experiments" / "mask_discovery", out / "experiments" / "subnetwork"
        final_mask = sub / "masks" / "subnetwork.safetensors"
        reuse = {"final": (sub / "runs" / "subnetwork", final_mask),
                 "random": (sub / "runs" / "random", sub / "masks" / "random.safetensors")}
        manifest.run("mask-discovery", "experiment", md_dir, lambda: run_mask_discovery(
            experiment, md_dir, full_run=runs[main], final_mask=final_mask, reuse=reuse,
            arm_overrides=experiment_common(cfg), after_arm=prune_arm if cfg.prune else None), out)
    if "optimizers" in cfg.arms:
        opt_dir = out / "experiments" / "optimizers"
        evidence = {family: runs[name] for family, name in (("opd", main), ("sft", "sft"), ("rl", "rl"))
                    if name in runs}
        experiment.evidence_methods = list(evidence)
        reuse = {("adamw", base.optim.lr): runs[main]} if base.optim.lr in cfg.adamw_lrs else None
        manifest.run("optimizers", "experiment", opt_dir, lambda: run_optimizers(
            experiment, opt_dir, evidence_runs=evidence, reuse=reuse, arm_overrides=experiment_common(cfg),
            start_from=runs[main], after_arm=prune_arm if cfg.prune and "lr_sweep" not in cfg.arms else None), out)
        if "lr_sweep" in cfg.arms:
            sweep_dir = out / "sweep"
            manifest.run("lr-sweep", "sweep", sweep_dir, lambda: lr_sweep(
                source, opt_dir, sweep_dir, cfg.adamw_lrs, base, reuse or {}), out)

    # ---- 5. the report, and the findings on the terminal
    return write_report(manifest, out, runs)


def prune_run(run_dir: Path, keep_fp32: bool = False) -> None:
    """Delete what a finished arm no longer needs: its resumable checkpoints (weights and optimizer state)
    and, unless `keep_fp32`, its fp32 final weights. final/ (bf16), metrics and run.json stay, so the
    arm still counts as finished on --resume and its bf16 analysis can run."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if not keep_fp32:
        shutil.rmtree(run_dir / "final-fp32", ignore_errors=True)


def prune_arm(run_dir: Path) -> None:
    """`prune_run` for an experiment arm that is never analysed: its final weights go too. metrics.jsonl,
    evals/, config.yaml and run.json stay (marked `weights_pruned`), so it still counts as finished."""
    prune_run(run_dir)
    info = read_run_info(run_dir)
    if info.get("status") == "finished" and not info.get("weights_pruned"):
        write_run_info(run_dir, {**info, "weights_pruned": True})
    shutil.rmtree(run_dir / "final", ignore_errors=True)


def lr_sweep(source: Path, opt_dir: Path, sweep_dir: Path, lrs: list[float], base: DistillConfig,
             reuse: dict[tuple[str, float], Path]) -> Path:
    """Analyse the AdamW arms of the optimizer comparison: bf16 sparsity against step size (lr_sweep.json)."""
    points = []
    for lr in lrs:
        run_dir = reuse.get(("adamw", lr), opt_dir / "runs" / f"adamw-lr{lr:g}")
        dest = sweep_dir / f"lr-{lr:g}"
        analyze_pair(source, run_dir, dest)
        summary = json.loads((dest / "analysis.json").read_text(encoding="utf-8"))["summary"]
        evaluation = final_eval(run_dir)
        points.append({"lr": lr, "sparsity_bf16": summary.get("sparsity"), "sparsity_fp32": summary.get("sparsity_fp32"),
                       "below_half_ulp_fraction": summary.get("below_half_ulp_fraction"),
                       "relative_update_norm": summary.get("relative_update_norm"),
                       "accuracy": evaluation["accuracy"], "reverse_kl": evaluation["reverse_kl"],
                       "analysis_dir": relative_path(dest, sweep_dir), "run_dir": relative_path(run_dir, sweep_dir)})
    return write_json(sweep_dir / "lr_sweep.json", {"schema": 1, "method": base.method, "optimizer": "adamw",
                                                    "steps": base.run.steps, "points": points})

