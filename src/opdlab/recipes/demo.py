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
  experiments/subnetwork           retraining only the OPD subnetwork, the fp32 largest-update coordinates and a
                                   random mask of matched density
  experiments/mask_discovery       (default, full) retraining on masks found after 10/25/50 % of the main run, on
                                   the source's lowest-|W| coordinates, and the subnetwork arm's final and random masks
  experiments/optimizers           AdamW vs SGD (with and without momentum), each with a learning-rate sweep
  sweep/                           OPD at several step sizes: how much of "sparse" is bf16 storage rounding
  report/report.html               every finding with its evidence (`opdlab report` renders it again from files)

The demo is a preset of `opdlab study` (recipes/study.py): it only chooses the pair, the task and
the budget; the stages are the study's.

Where the demo deviates from the study, and why:
1. The models are ~1 M parameters, trained from scratch on synthetic tasks; the study used 1.5B+
   pretrained models. Tiny models need larger relative steps to learn at all, so the main runs use a
   larger learning rate than the study's 1e-6 and the sweep shows what smaller steps do to the
   measured sparsity (README.md, "What the demo shows"; the findings table reports whatever it measures).
2. Budgets are a few hundred rollouts per run instead of thousands, so accuracies are noisy; the
   report's rules mark differences within noise as inconclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opdlab.config import DemoConfig, DistillConfig, StudyConfig, load_config
from opdlab.recipes.demo_real import demo_real
from opdlab.recipes.demo_vlm import demo_vlm
from opdlab.recipes.study import run_study


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
    discovery: bool = False  # the mask-discovery arm (early and source-only masks)
    extra: dict[str, Any] = field(default_factory=dict)


# The demo's sizes, its experiments included (they reuse the demo's main runs). `opdlab experiment
# --preset` has its own table, opdlab.recipes.experiment.PRESETS, for experiments that train every arm.
PRESETS: dict[str, Preset] = {
    "quick": Preset(steps=30, lr=3e-4, prompts_per_step=16, samples_per_prompt=4, num_eval=128,
                    sweep_lrs=[1e-6, 1e-4, 3e-4], sgd_lrs=[0.01, 0.03, 0.1]),
    "default": Preset(steps=60, lr=1e-4, prompts_per_step=16, samples_per_prompt=4, num_eval=200,
                      sweep_lrs=[1e-6, 1e-5, 1e-4, 1e-3], sgd_lrs=[0.01, 0.03, 0.1], seeds=2, eval_every=20,
                      discovery=True),
    "full": Preset(steps=300, lr=3e-5, prompts_per_step=32, samples_per_prompt=4, num_eval=500,
                   sweep_lrs=[1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3], sgd_lrs=[0.003, 0.01, 0.03, 0.1, 0.3],
                   seeds=3, eval_every=50, discovery=True),
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


def tiny_study(cfg: DemoConfig) -> StudyConfig:
    """The study on the built-in pair sort-tiny at the demo preset's budget."""
    preset = PRESETS[cfg.preset]
    study = load_config(StudyConfig, None, {
        "out": cfg.out, "overwrite": cfg.overwrite, "resume": cfg.resume, "method": "opd",
        "arms": ["seeds", "sft", "rl", "compare", "subnetwork", "optimizers", "lr_sweep"]
        + (["mask_discovery"] if preset.discovery else []), "seeds": preset.seeds,
        # the update of the main run and its baselines, ten times per run (report: "how the update grows")
        "track_update_every": max(1, preset.steps // 10),
        "rl_samples_per_prompt": preset.samples_per_prompt,
        # the mask is every bf16-changed coordinate (|Δ| > 0): on a model trained from scratch at large steps
        # nearly all of them move by far more than 1e-5
        "mask_atol": 0.0, "mask_dtype": "bf16", "top_update_mask": True,
        "adamw_lrs": preset.sweep_lrs, "sgd_lrs": preset.sgd_lrs, "sgd_momentum_lrs": preset.sgd_lrs,
        "sgd_momentum": 0.9})
    study.train = base_config(preset, Path(cfg.out) / "runs" / "opd")
    return study


def demo(cfg: DemoConfig) -> Path:
    """Run the study on the built-in pair into `cfg.out`; return the report's path."""
    if cfg.vlm:  # the smaller study on the vision-language pair (recipes/demo_vlm.py)
        return demo_vlm(cfg)
    if cfg.real:  # on-policy self-distillation of a real pretrained model (recipes/demo_real.py)
        return demo_real(cfg)
    return run_study(tiny_study(cfg), cfg.preset, announce=f"opdlab demo ({cfg.preset}) -> {cfg.out}")
