"""`opdlab demo`: the whole study at small scale on the built-in pair, offline, on CPU.

    opdlab demo             # the default preset
    opdlab demo --quick     # a first look: a few minutes on a laptop CPU
    opdlab demo --full      # longer runs, wider sweeps
    opdlab demo --resume    # continue an interrupted demo; finished stages are kept
    opdlab demo --vlm       # a smaller study on the vision-language pair (recipes/demo_vlm.py)
    opdlab demo --real      # self-distillation of SmolLM2-135M-Instruct (recipes/demo_real.py)

From one source student (the zoo pair's), in `--out` (default `opdlab-demo/`):
  runs/opd, runs/sft, runs/rl      OPD with AdamW and the SFT / RL baselines, matched budgets, bf16 + fp32 checkpoints
  analysis/<run>                   how each run changed the source (bf16; the fp32 twin of opd for the precision control)
  compare/<a>-vs-<b>               overlap of the update masks between runs, against chance
  experiments/subnetwork           retraining only the OPD subnetwork, and a random mask of matched density
  experiments/optimizers           AdamW vs SGD (with and without momentum), each with a learning-rate sweep
  sweep/                           OPD at several step sizes: how much of "sparse" is bf16 storage rounding
  report/report.html               every finding with its evidence (`opdlab report` renders it again from files)

Where the demo deviates from the study, and why:
1. The models are ~1 M parameters, trained from scratch on synthetic tasks; the study used 1.5B+
   pretrained models. Tiny models need larger relative steps to learn at all, so the main runs use a
   larger learning rate than the study's 1e-6 and the sweep shows what smaller steps do to the
   measured sparsity (README.md, "What the demo shows"; the findings table reports whatever it measures).
2. Budgets are a few hundred rollouts per run instead of thousands, so accuracies are noisy; the
   report's rules mark differences within noise as inconclusive.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opdlab.config import CompareConfig, DemoConfig, DistillConfig, ExperimentConfig, load_config
from opdlab.fileio import prepare_out_dir, relative_path, write_json
from opdlab.models.zoo import build_pair
from opdlab.recipes.compare import compare
from opdlab.recipes.demo_real import demo_real
from opdlab.recipes.demo_stages import Manifest, analyze_pair, analyze_runs, write_report
from opdlab.recipes.demo_vlm import demo_vlm
from opdlab.recipes.experiment import final_eval, run_optimizers, run_subnetwork, train_arm


@dataclass(frozen=True)
class Preset:
    """Sizes of one demo preset (see module docs)."""

    steps: int  # optimizer steps of every training run
    lr: float  # AdamW learning rate of the main runs
    prompts_per_step: int
    samples_per_prompt: int
    num_eval: int
    sweep_lrs: list[float]  # OPD + AdamW learning rates for the step-size sweep (and AdamW's arm of the ablation)
    sgd_lrs: list[float]  # SGD learning rates (with and without momentum)
    seeds: int = 1  # OPD runs with different seeds, for mask overlap across seeds
    eval_every: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# The demo's sizes, its experiments included (they reuse the demo's main runs). `opdlab experiment
# --preset` has its own table, opdlab.recipes.experiment.PRESETS, for experiments that train every arm.
PRESETS: dict[str, Preset] = {
    "quick": Preset(steps=30, lr=3e-4, prompts_per_step=16, samples_per_prompt=4, num_eval=128,
                    sweep_lrs=[1e-6, 1e-4, 3e-4], sgd_lrs=[0.01, 0.03, 0.1]),
    "default": Preset(steps=60, lr=1e-4, prompts_per_step=16, samples_per_prompt=4, num_eval=200,
                      sweep_lrs=[1e-6, 1e-5, 1e-4, 1e-3], sgd_lrs=[0.01, 0.03, 0.1], seeds=2, eval_every=20),
    "full": Preset(steps=300, lr=3e-5, prompts_per_step=32, samples_per_prompt=4, num_eval=500,
                   sweep_lrs=[1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3], sgd_lrs=[0.003, 0.01, 0.03, 0.1, 0.3],
                   seeds=3, eval_every=50),
}


def base_config(preset: Preset, out: Path) -> DistillConfig:
    """The OPD run every other run of the demo is a variation of."""
    return load_config(DistillConfig, None, {
        "method": "opd", "out": str(out), "optim.optimizer": "adamw", "optim.lr": preset.lr,
        "run.steps": preset.steps, "run.save_dtype": "both", "run.eval_every": preset.eval_every,
        "run.save_every": 0, "run.keep_checkpoints": 1, "rollout.prompts_per_step": preset.prompts_per_step,
        "rollout.samples_per_prompt": preset.samples_per_prompt, "data.num_eval": preset.num_eval,
        # One torch thread: the ~1 M-parameter models gain little from a second thread, and two
        # threads on two busy cores slow a step down by an order of magnitude (docs/benchmarks.md, "Threads").
        "run.threads": 1, **preset.extra,
    })


def demo(cfg: DemoConfig) -> Path:
    """Run the study on the built-in pair into `cfg.out`; return the report's path."""
    if cfg.vlm:  # the smaller study on the vision-language pair (recipes/demo_vlm.py)
        return demo_vlm(cfg)
    if cfg.real:  # on-policy self-distillation of a real pretrained model (recipes/demo_real.py)
        return demo_real(cfg)
    preset = PRESETS[cfg.preset]
    out = Path(cfg.out)
    if not (cfg.resume and out.is_dir()):
        prepare_out_dir(out, cfg.overwrite)
    manifest = Manifest(out, cfg.preset, cfg.resume)
    print(f"opdlab demo ({cfg.preset}) -> {out}", flush=True)

    pair = build_pair("sort-tiny")  # cached after the first build
    source = Path(pair.student)
    base = base_config(preset, out / "runs" / "opd")

    # ---- 1. the three methods from one source, matched budgets
    runs: dict[str, Path] = {}
    for method in ("opd", "sft", "rl"):
        run_dir = out / "runs" / method
        runs[method] = run_dir
        manifest.run(method, "run", run_dir, lambda m=method, d=run_dir: train_arm(base, d, {"method": m}), out)
    for seed in range(1, preset.seeds):
        run_dir = out / "runs" / f"opd-seed{seed}"
        runs[f"opd-seed{seed}"] = run_dir
        manifest.run(f"opd-seed{seed}", "run", run_dir, lambda s=seed, d=run_dir: train_arm(base, d, {"run.seed": s}), out)

    # ---- 2. what each run changed
    analyze_runs(manifest, source, runs, out)

    # ---- 3. do different runs change the same coordinates?
    pairs = [("opd", "rl"), ("opd", "sft"), ("sft", "rl")] + [("opd", f"opd-seed{s}") for s in range(1, preset.seeds)]
    for a, b in pairs:
        dest = out / "compare" / f"{a}-vs-{b}"
        manifest.run(f"compare-{a}-vs-{b}", "compare", dest, lambda a=a, b=b, d=dest: compare(load_config(
            CompareConfig, None, {"base": str(source), "run_a": str(runs[a]), "run_b": str(runs[b]), "out": str(d),
                                  "overwrite": True})), out)

    # ---- 4. experiments: subnetwork retraining and the optimizer ablation
    experiment = load_config(ExperimentConfig, None, {"adamw_lrs": preset.sweep_lrs, "sgd_lrs": preset.sgd_lrs})
    experiment.train = copy.deepcopy(base)
    sub_dir = out / "experiments" / "subnetwork"
    manifest.run("subnetwork", "experiment", sub_dir, lambda: run_subnetwork(experiment, sub_dir, full_run=runs["opd"]), out)
    opt_dir = out / "experiments" / "optimizers"
    manifest.run("optimizers", "experiment", opt_dir, lambda: run_optimizers(
        experiment, opt_dir, evidence_runs={m: runs[m] for m in ("opd", "sft", "rl")}), out)

    # ---- 5. step size against storage precision: the AdamW arms of the ablation, analyzed
    sweep_dir = out / "sweep"

    def _sweep() -> Path:
        points = []
        for lr in preset.sweep_lrs:
            run_dir = opt_dir / "runs" / f"adamw-lr{lr:g}"
            dest = sweep_dir / f"lr-{lr:g}"
            analyze_pair(source, run_dir, dest)
            summary = json.loads((dest / "analysis.json").read_text(encoding="utf-8"))["summary"]
            evaluation = final_eval(run_dir)
            points.append({"lr": lr, "sparsity_bf16": summary.get("sparsity"), "sparsity_fp32": summary.get("sparsity_fp32"),
                           "below_half_ulp_fraction": summary.get("below_half_ulp_fraction"),
                           "relative_update_norm": summary.get("relative_update_norm"),
                           "accuracy": evaluation["accuracy"], "reverse_kl": evaluation["reverse_kl"],
                           "analysis_dir": relative_path(dest, sweep_dir), "run_dir": relative_path(run_dir, sweep_dir)})
        return write_json(sweep_dir / "lr_sweep.json", {"schema": 1, "method": "opd", "optimizer": "adamw",
                                                        "steps": preset.steps, "points": points})

    manifest.run("lr-sweep", "sweep", sweep_dir, _sweep, out)

    # ---- 6. the report, and the findings on the terminal
    return write_report(manifest, out, runs)
