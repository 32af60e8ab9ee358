"""Configuration: one dataclass per concern, loaded as defaults <- YAML <- command-line flags.

Each field is documented once, by the string literal written right under it (an attribute
docstring, as litgpt documents its configs). That string is the `--help` text of the field's
flag: `opdlab.flags` reads it from this file's source with `ast`, and takes the flag's type,
choices and default from the field's type hint and default; `cli.py` only lists which fields
each command exposes. `tests/unit/test_flags.py` fails when a field has no docstring or a flag
names no field. `load_config` checks every key and type and raises a one-line `UserError` naming
the file and field at fault (`config_loading.py`). The resolved config is saved into every run
folder (`to_yaml`), without the fields marked `NOT_SAVED` (how to run a command, such as
`overwrite`, rather than what it computes). Choices are `Literal[...]` and checked by value.

Example::

    cfg = load_config(DistillConfig, "run.yaml", {"optim.lr": 1e-5, "method": "sft"})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The loader lives in config_loading.py; these names stay importable from here (the config API).
from opdlab.config_loading import NOT_SAVED, check, load_config, parse_set, to_dict, to_yaml  # noqa: F401

# ----------------------------------------------------------------------------- training


@dataclass
class ModelConfig:
    """Which models to train and score with."""

    student: str | None = None
    """the student's source model: an HF model folder, a .gguf file, an opdlab run folder or a shipped model
    name (smollm2-135m-instruct); empty = the built-in pair's student."""
    teacher: str | None = None
    """the teacher, in the same forms as the student; empty = the built-in pair's teacher (for method opsd:
    the student's own source model)."""
    pair: str = "sort-tiny"
    """built-in pair used when student and teacher are not given (see `opdlab zoo list`; a vision-language
    pair such as shapes-vlm-tiny works too)."""
    device: str = "cpu"
    """torch device for training ("cpu", "cuda", "cuda:1")."""
    trust_remote_code: bool = False
    """allow model code shipped with a checkpoint to run (off unless you ask)."""
    shard_teacher: bool = False
    """under torchrun, shard the teacher with FSDP2 too (forward only) instead of a full copy per process."""


@dataclass
class DataConfig:
    """Where prompts come from."""

    task: str | None = None
    """built-in task for generated prompts and accuracy; empty = the pair's default task mix."""
    prompts: str | None = None
    """prompts file (.jsonl or .parquet) or a `datasets` folder saved to disk; empty = prompts generated from
    the task."""
    prompt_field: str = "prompt"
    """prompts-file field holding the prompt text."""
    answer_field: str = "answer"
    """prompts-file field holding the reference answer (used for accuracy and the RL reward; optional for
    opd)."""
    image_field: str = "image"
    """prompts-file field holding an image path (relative to the prompts file) for vision-language pairs."""
    privileged_field: str = "privileged"
    """method opsd: prompts-file field with privileged context only the teacher sees; records without it use
    their answer."""
    privileged_template: str = "{prompt}\n\nHint: the answer is {privileged}."
    """the teacher's user message for method opsd, with {prompt} and {privileged} placeholders."""
    privileged_teacher: bool = False
    """methods sft and rl: the teacher is the student's frozen source behind the privileged prompt
    (data.privileged_template), as for opsd; sft trains on its completions, and both measure the evaluation's
    reverse KL against it (the baselines of a self-distillation study)."""
    eval_prompts: str | None = None
    """held-out prompts file; empty = generated held-out prompts of the task, or a split of the prompts
    file."""
    num_eval: int = 128
    """number of held-out prompts to evaluate on."""
    max_prompt_tokens: int = 512
    """prompts longer than this (after the chat template) are an error."""


@dataclass
class RolloutConfig:
    """How completions are sampled."""

    prompts_per_step: int = 16
    """prompts per optimizer step."""
    samples_per_prompt: int = 4
    """completions sampled per prompt (the RL group size)."""
    max_new_tokens: int = 16
    """completion length limit."""
    temperature: float = 1.0
    """sampling temperature (1.0 = on-policy)."""
    top_p: float = 1.0
    """nucleus sampling threshold (1.0 = off)."""
    micro_batch: int = 64
    """sequences per forward/backward pass (gradient accumulation splits the step into these)."""
    backend: Literal["hf", "vllm"] = "hf"
    """who generates the rollouts: hf (transformers generate) or vllm (needs the vllm extra and a GPU)."""


@dataclass
class LossConfig:
    """The per-token training signal."""

    loss: Literal["reverse_kl", "forward_kl", "jsd", "topk_reverse_kl", "sampled", "k2", "k3"] = "reverse_kl"
    """the opd loss: reverse_kl (full vocabulary), forward_kl, jsd (continuous generalized JSD),
    topk_reverse_kl, sampled (k1 as a policy-gradient advantage), k2 or k3."""
    beta: float = 0.5
    """JSD mixture weight in [0, 1]; 0 = forward KL, 1 = reverse KL."""
    top_k: int = 32
    """vocabulary entries kept (plus a tail bucket) for topk_reverse_kl."""
    vocab_chunk: int = 4096
    """positions per chunk when taking log-softmax over large vocabularies."""
    rl_kl_coef: float = 0.0
    """KL-to-source penalty for method rl (0 = none)."""


@dataclass
class OptimConfig:
    """Optimizer and schedule."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw or sgd."""
    lr: float = 1e-4
    """peak learning rate."""
    weight_decay: float = 0.0
    """decoupled weight decay (AdamW) or L2 (SGD)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.999
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum (0 = plain SGD)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """constant or cosine (with warmup)."""
    warmup_steps: int = 0
    """linear warmup steps."""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = off)."""
    mask: str | None = None
    """subnetwork mask (.safetensors): train only these coordinates; the others stay bit-identical."""


@dataclass
class RunConfig:
    """Length, logging and checkpoints of a run."""

    steps: int = 100
    """optimizer steps."""
    seed: int = 0
    """seed for sampling, data order and initialisation of anything random."""
    eval_every: int = 25
    """evaluate every N steps (and at step 0 and the end); 0 = only at 0 and the end."""
    eval_start: bool = True
    """evaluate the source at step 0 (off: a study's arms, which share the main run's source and held-out
    prompts, take the main run's step-0 evaluation instead)."""
    save_every: int = 50
    """checkpoint every N steps (and at the end); 0 = only at the end."""
    save_dtype: Literal["bf16", "fp32", "both"] = "bf16"
    """checkpoint storage dtype: bf16 (as public checkpoints), fp32, or both (final-fp32/ beside final/)."""
    keep_checkpoints: int = 2
    """how many step checkpoints to keep (the newest); final/ is always kept."""
    tensorboard: bool = False
    """also write TensorBoard event files (needs the tensorboard extra)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    track_update_every: int = 0
    """every N steps, log how the student differs from its source (bf16-visible changed fraction, relative
    norm and Jaccard with the previous measurement, whole model and per block) as update/... metrics;
    0 = off. Reads the source from disk one tensor at a time; one process only (not under FSDP2)."""
    save_update_masks: bool = False
    """with track_update_every: also save each measurement's changed mask, bit-packed, as masks/step-N.safetensors
    (usable as --mask)."""
    precision: Literal["fp32", "bf16-mixed"] = "fp32"
    """arithmetic of rollouts, teacher scoring and the student's forward/backward: fp32, or bf16-mixed (matrix
    products under bf16 autocast; fp32 master weights, optimizer state, loss and log-softmax). bf16-mixed is
    faster only where the hardware has bf16 matrix units (Intel AMX, recent GPUs); docs/training.md."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """what a NaN/inf loss or gradient does: stop (one-line error naming the step; the last good checkpoint is
    kept) or skip (drop that batch: no optimizer step, logged as train/skipped_nonfinite)."""


@dataclass
class DistillConfig:
    """One training run: method opd | opsd | sft | rl."""

    method: Literal["opd", "opsd", "sft", "rl"] = "opd"
    """opd (the student samples, the teacher scores every token), opsd (on-policy self-distillation: the
    teacher is the student's frozen source model, shown privileged context), sft (train on teacher
    completions) or rl (GRPO-style verifier reward)."""
    out: str = "runs/distill"
    """run folder."""
    resume: str | None = field(default=None, metadata=NOT_SAVED)
    """continue the run in this folder from its newest checkpoint (on the command line its config.yaml is the
    config unless --config is given, and the folder is --out unless --out is given)."""
    overwrite: bool = field(default=False, metadata=NOT_SAVED)
    """replace a non-empty run folder."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """the models (student, teacher, pair, device)."""
    data: DataConfig = field(default_factory=DataConfig)
    """the prompts (task, prompts file and its fields, held-out prompts)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """how completions are sampled."""
    loss: LossConfig = field(default_factory=LossConfig)
    """the per-token training signal."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimizer, schedule and mask."""
    run: RunConfig = field(default_factory=RunConfig)
    """length, seed, logging and checkpoints."""

    def __post_init__(self) -> None:
        check(0.0 <= self.loss.beta <= 1.0, "loss.beta", "must be in [0, 1]")
        check(self.optim.lr > 0, "optim.lr", "must be positive")
        check(self.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(0 <= self.optim.momentum < 1, "optim.momentum", "must be in [0, 1)")
        check(0 <= self.optim.beta1 < 1 and 0 <= self.optim.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        check(self.optim.eps > 0, "optim.eps", "must be positive (AdamW divides by sqrt(v) + eps)")
        check(self.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
        check(self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.run.steps >= 1, "run.steps", "must be >= 1")
        check(self.run.eval_every >= 0 and self.run.save_every >= 0, "run.eval_every/save_every", "must be >= 0")
        check(self.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
        check(self.run.track_update_every >= 0, "run.track_update_every", "must be >= 0")
        check(not self.run.save_update_masks or self.run.track_update_every > 0, "run.save_update_masks",
              "needs run.track_update_every > 0 (masks are saved at the tracked steps)")
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
    """`opdlab analyze BASE TUNED`: how TUNED differs from BASE."""

    base: str = ""
    """source checkpoint: an HF model folder, a .safetensors file, an opdlab run folder, a .gguf file or a
    shipped model name."""
    tuned: str = ""
    """tuned checkpoint, in the same forms as the base."""
    out: str = "analysis"
    """output folder."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """analysis dtype: both sides are cast to it before subtracting."""
    device: str = "cpu"
    """torch device for the math ("cpu", "cuda")."""
    skip_mismatched: bool = False
    """skip (and list) tensors missing on one side or with different shapes, instead of failing."""
    workers: int = 0
    """threads for per-tensor work (0 = automatic)."""
    exact_svd_max: int = 1024
    """largest min(m, n) for exact singular values; larger matrices use a randomized top-k method."""
    overwrite: bool = field(default=False, metadata=NOT_SAVED)
    """replace a non-empty output folder."""


@dataclass
class CompareConfig:
    """`opdlab compare BASE RUN_A RUN_B`: overlap of two runs' update masks against chance."""

    base: str = ""
    """the shared source checkpoint."""
    run_a: str = ""
    """first tuned checkpoint or run folder."""
    run_b: str = ""
    """second tuned checkpoint or run folder."""
    out: str = "compare"
    """output folder."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """analysis dtype."""
    atol: float = 0.0
    """a coordinate counts as changed when |delta| > atol."""
    device: str = "cpu"
    """torch device."""
    skip_mismatched: bool = False
    """skip (and list) tensors that do not match, instead of failing."""
    overwrite: bool = field(default=False, metadata=NOT_SAVED)
    """replace a non-empty output folder."""


@dataclass
class MaskConfig:
    """`opdlab mask`: extract, randomize, combine or measure subnetwork masks."""

    base: str | None = None
    """source checkpoint (extract mode)."""
    tuned: str | None = None
    """tuned checkpoint (extract mode)."""
    out: str = "mask.safetensors"
    """output .safetensors file (or a .json file with --overlap)."""
    atol: float = 0.0
    """changed when |delta| > atol in the analysis dtype."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """analysis dtype."""
    device: str = "cpu"
    """torch device."""
    random_like: str | None = None
    """draw a random control with the same per-tensor density as this mask."""
    top_like: str | None = None
    """with BASE TUNED: the coordinates of the largest |TUNED - BASE| in --dtype (fp32 for the update itself),
    as many per tensor as this mask holds."""
    union: list[str] = field(default_factory=list)
    """masks to combine by union."""
    intersect: list[str] = field(default_factory=list)
    """masks to combine by intersection."""
    overlap: list[str] = field(default_factory=list)
    """two masks whose overlap to measure (written as JSON and printed)."""
    seed: int = 0
    """seed for --random-like."""
    overwrite: bool = field(default=False, metadata=NOT_SAVED)
    """replace an existing output file."""


@dataclass
class DeltaConfig:
    """`opdlab delta BASE TUNED` / `opdlab delta --apply BASE DELTA`: an exact sparse delta, made or applied."""

    base: str | None = None
    """source checkpoint (make mode): an HF model folder, a .safetensors file or an opdlab run folder."""
    tuned: str | None = None
    """tuned checkpoint (make mode), in the same forms as the base."""
    apply: list[str] = field(default_factory=list)
    """BASE and DELTA file (apply mode): rebuild TUNED from them."""
    out: str = "delta.safetensors"
    """the delta .safetensors file (make mode) or the model folder to write (apply mode)."""
    overwrite: bool = field(default=False, metadata=NOT_SAVED)
    """replace an existing output file or folder."""


@dataclass
class ReportConfig:
    """`opdlab report DIR`: one self-contained report.html from what is on disk."""

    path: str = ""
    """a demo, run, analysis, compare or experiment folder (or a folder holding several)."""
    out: str | None = None
    """where report.html and its figures go; empty = DIR/report."""


@dataclass
class ZooConfig:
    """`opdlab zoo list | build NAME`."""

    action: Literal["list", "build"] = "list"
    """list the built-in pairs and shipped models, or build one."""
    name: str | None = None
    """the pair (or shipped model) to build."""
    rebuild: bool = False
    """build again even if cached (retrains from the seed)."""


@dataclass
class DemoConfig:
    """`opdlab demo`: the whole study on the built-in pair."""

    preset: Literal["quick", "default", "full"] = "default"
    """quick (a first look: a few minutes on a laptop CPU), default (the study at small scale) or full
    (longer runs, wider sweeps, more faithful)."""
    out: str = "opdlab-demo"
    """demo folder."""
    overwrite: bool = field(default=False, metadata=NOT_SAVED)
    """replace a non-empty demo folder."""
    resume: bool = field(default=False, metadata=NOT_SAVED)
    """continue an interrupted demo in its folder, skipping finished stages."""
    vlm: bool = False
    """run the study on the built-in vision-language pair (shapes-vlm-tiny) instead."""
    real: bool = False
    """self-distill a real pretrained model, SmolLM2-135M-Instruct, instead (needs opdlab[real]; slower than
    the tiny pair: a 135M-parameter model on CPU)."""

    def __post_init__(self) -> None:
        check(not (self.vlm and self.real), "vlm/real", "are exclusive: pick --vlm or --real")


@dataclass
class ExperimentConfig:
    """`opdlab experiment subnetwork | optimizers`: the study's two training experiments."""

    kind: Literal["subnetwork", "optimizers", "mask-discovery"] = "subnetwork"
    """subnetwork (full OPD, then retrain only its updated coordinates, and a random mask of matched
    density), optimizers (AdamW vs SGD with and without momentum, each with a learning-rate sweep) or
    mask-discovery (retrain on masks found early in the full run, from the source alone, or at random)."""
    out: str = "experiment"
    """experiment folder."""
    preset: Literal["quick", "default", "full"] | None = None
    """size preset, applied over the --config file and under --set: quick (shorter runs, two learning rates
    per optimizer), default (the defaults) or full (longer runs, wider sweeps); the values are
    opdlab.recipes.experiment.PRESETS."""
    train: DistillConfig = field(default_factory=DistillConfig)
    """the OPD run every arm starts from (same source, data order, seed and schedule)."""
    mask_atol: float = 0.0
    """a coordinate belongs to the subnetwork when |delta| > mask_atol in mask_dtype."""
    mask_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype in which the full run's update is compared to find the subnetwork."""
    top_update_mask: bool = False
    """subnetwork experiment: also retrain on the coordinates of the largest fp32 update, at the subnetwork
    mask's per-tensor density (does the mask carry more than update size?)."""
    discovery_fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    """mask-discovery: fractions of the full run's steps at which its changed mask is taken (each at the first
    tracked step at or after it; the final mask is always an arm)."""
    discovery_every: int = 0
    """mask-discovery: measure the full run's update (and save its mask) every this many steps; 0 = about a tenth
    of the run (run.track_update_every, run.save_update_masks)."""
    adamw_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    """learning rates swept for AdamW (optimizers experiment)."""
    sgd_lrs: list[float] = field(default_factory=lambda: [1e-2, 1e-1, 1.0])
    """learning rates swept for SGD, with and without momentum (optimizers experiment)."""
    sgd_momentum_lrs: list[float] = field(default_factory=list)
    """learning rates swept for SGD with momentum; empty = sgd_lrs."""
    sgd_momentum: float = 0.9
    """momentum of the SGD-with-momentum arm."""
    evidence_methods: list[str] = field(default_factory=lambda: ["opd", "sft", "rl"])
    """methods whose Adam second-moment spread is measured (opd, sft, rl)."""
    overwrite: bool = field(default=False, metadata=NOT_SAVED)
    """replace a non-empty experiment folder."""
    resume: bool = field(default=False, metadata=NOT_SAVED)
    """keep the arms already finished in the experiment folder and run only the missing ones."""

    def __post_init__(self) -> None:
        check(all(lr > 0 for lr in self.adamw_lrs + self.sgd_lrs + self.sgd_momentum_lrs),
              "adamw_lrs/sgd_lrs/sgd_momentum_lrs", "must be positive")
        check(bool(self.adamw_lrs) and bool(self.sgd_lrs), "adamw_lrs/sgd_lrs", "must not be empty")
        check(0 <= self.sgd_momentum < 1, "sgd_momentum", "must be in [0, 1)")
        check(self.mask_atol >= 0, "mask_atol", "must be >= 0")
        check(all(0 < f < 1 for f in self.discovery_fractions), "discovery_fractions", "must lie strictly between 0 and 1")
        check(self.discovery_every >= 0, "discovery_every", "must be >= 0")
        bad = [m for m in self.evidence_methods if m not in ("opd", "sft", "rl")]
        check(not bad, "evidence_methods", "may only hold opd, sft, rl")


STUDY_ARMS = ("seeds", "sft", "rl", "subnetwork", "optimizers", "compare", "lr_sweep", "mask_discovery")


@dataclass
class StudyConfig:
    """`opdlab study`: the whole study on one pair (or one model and its privileged self), in one command."""

    student: str | None = None
    """the source student: an HF model folder, a .gguf file, an opdlab run folder or a shipped model name
    (smollm2-135m-instruct); empty = train.model's (the built-in pair's student)."""
    teacher: str | None = None
    """the teacher for method opd, in the same forms; method opsd needs none (the teacher is the student's
    source shown privileged context)."""
    prompts: str | None = None
    """training prompts file (.jsonl or .parquet; see `opdlab distill --help`); empty = train.data's."""
    task: str | None = None
    """built-in task for generated prompts and accuracy; empty = train.data's."""
    method: Literal["opd", "opsd"] | None = None
    """opd (a separate teacher) or opsd (self-distillation with privileged context); empty = train.method."""
    out: str = "opdlab-study"
    """study folder."""
    preset: Literal["quick", "default", "full"] = "default"
    """size preset, the base of the config (the --config file, flags and --set override it): quick, default or
    full (the values are opdlab.recipes.study.PRESETS)."""
    train: DistillConfig = field(default_factory=DistillConfig)
    """the main run every arm is a variation of (same source, prompts, schedule and budget)."""
    arms: list[str] = field(default_factory=lambda: ["seeds", "sft", "rl", "subnetwork", "optimizers", "compare"])
    """which parts to run beside the main run and its analyses: seeds (more seeds of the main run), sft and rl
    (baselines), subnetwork (retraining on masks), optimizers (AdamW vs SGD), compare (mask overlaps),
    lr_sweep (analyses of the AdamW arms: sparsity against step size)."""
    seeds: int = 2
    """runs of the main configuration with seeds 0 .. seeds-1 (arm seeds), for mask overlap across seeds."""
    rl_samples_per_prompt: int = 4
    """completions per prompt of the RL baseline (its group size, >= 2); its other settings are the main run's."""
    mask_atol: float = 1e-5
    """subnetwork mask: coordinates with |delta| > mask_atol in mask_dtype (the study's visible update)."""
    mask_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype in which the main run's update is compared to find the subnetwork."""
    top_update_mask: bool = True
    """subnetwork arm: also retrain on the fp32 largest-update coordinates at the mask's per-tensor density."""
    discovery_fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    """mask_discovery arm: fractions of the main run's steps at which its changed mask is taken."""
    track_update_every: int = 0
    """measure the update of the main run, its seeds and baselines every this many steps (run.track_update_every;
    the main run also saves its masks); 0 = off, unless mask_discovery needs it (then about a tenth of the run)."""
    adamw_lrs: list[float] = field(default_factory=lambda: [1e-6, 3e-6])
    """AdamW learning rates of the optimizer comparison (at least 2; one equal to train.optim.lr reuses the main
    run)."""
    sgd_lrs: list[float] = field(default_factory=lambda: [1e-2, 1e-1, 1.0])
    """plain SGD learning rates (at least 3, so the best can be checked to lie inside the grid)."""
    sgd_momentum_lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    """SGD-with-momentum learning rates (at least 3)."""
    sgd_momentum: float = 0.9
    """momentum of the SGD-with-momentum arms."""
    prune: bool = False
    """delete what a finished arm no longer needs once its figures are taken: resumable checkpoints, fp32 finals
    of all but the main run, and every weight of the experiment arms (subnetwork, mask discovery, optimizers),
    which keep their metrics; keeps a study of a large model within disk; --resume still skips finished arms."""
    share_start_eval: bool = False
    """arms skip their step-0 evaluation and report the main run's (same source, same held-out prompts): one
    evaluation less per arm."""
    overwrite: bool = field(default=False, metadata=NOT_SAVED)
    """replace a non-empty study folder."""
    resume: bool = field(default=False, metadata=NOT_SAVED)
    """continue an interrupted study in its folder, skipping finished stages."""

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in STUDY_ARMS]
        check(not unknown, "arms", f"has unknown part(s) {unknown}; choose from {list(STUDY_ARMS)}")
        check(self.seeds >= 1, "seeds", "must be >= 1")
        check(self.rl_samples_per_prompt >= 2, "rl_samples_per_prompt", "must be >= 2 (the RL group baseline)")
        check(all(lr > 0 for lr in self.adamw_lrs + self.sgd_lrs + self.sgd_momentum_lrs),
              "adamw_lrs/sgd_lrs/sgd_momentum_lrs", "must be positive")
        check(self.mask_atol >= 0, "mask_atol", "must be >= 0")
        check(0 <= self.sgd_momentum < 1, "sgd_momentum", "must be in [0, 1)")
        check(all(0 < f < 1 for f in self.discovery_fractions), "discovery_fractions", "must lie strictly between 0 and 1")
        check(self.track_update_every >= 0, "track_update_every", "must be >= 0")
        check("mask_discovery" not in self.arms or "subnetwork" in self.arms, "arms",
              "mask_discovery reuses the subnetwork arm's final and random masks; add subnetwork")


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
