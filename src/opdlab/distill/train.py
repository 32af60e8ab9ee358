"""The training loop for all four methods: load -> roll out -> score -> loss -> step -> log -> checkpoint.

    run_dir = train(load_config(DistillConfig, None, {"method": "opd", "run.steps": 50}), Path("runs/opd"))

Methods differ only in who writes the completions and what the per-token signal is:
  opd  the student samples; the teacher scores every completion token; loss `cfg.loss.loss`.
  opsd opd with the student's own frozen source model as the teacher, which reads each prompt
       with privileged context (`data.privileged_template`) and scores the same completion
       tokens (distill/privileged.py).
  sft  the teacher samples (off-policy); cross-entropy of the student on those tokens.
  rl   the student samples; GRPO: the task checker's 0/1 reward, normalized within each
       prompt's group of `samples_per_prompt`, as a sequence-level policy-gradient advantage.
Every method is scored by the teacher, so `train/reverse_kl` is comparable across methods.

Where this loop deviates from common recipes, and why:
1. One update per rollout batch (no PPO epochs), so the sampling policy is the current
   student and no importance ratio is needed (as in the study's OPD recipe).
2. The loss of every micro-batch is divided by the completion tokens of the *whole step*
   (TRL #4719): gradient accumulation gives exactly the one-big-batch gradient.
3. Training prompts of step s are a pure function of (seed, s), so a resumed run needs no
   data iterator state and sees exactly the prompts the uninterrupted run would have.

How the file reads: `train` = `set_up` (load, check, build the optimizer, restore a checkpoint;
every choice that depends on the method or the kind of pair is made here, once) + `run_steps`
(roll out -> score -> loss -> step -> log -> checkpoint). Vision-language pairs (`models.vlm`,
docs/vlm.md) run the same loop: their rollouts come from `roll_out_visual` (each model's own
processor), and a `VisualRollout` answers the loop's questions (`logits`, `frozen_logits`,
`rows`, `num_tokens`) as a text `Rollout` does. The loss of one micro-batch lives in `distill/step.py`.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from opdlab.config import DistillConfig, RolloutConfig, to_yaml
from opdlab.data.prompts import check_prompt_lengths, render_prompts
from opdlab.data.visual_tasks import visual_task_names
from opdlab.dist.fsdp import shard_masks, shard_model
from opdlab.dist.runtime import DistContext, NullLog, check_divisible, init_from_env, scalar
from opdlab.distill import checkpoint as ckpt
from opdlab.distill import sharded_checkpoint as dist_ckpt
from opdlab.distill.evaluate import evaluate, evaluate_visual, has_answers, rollout_correct
from opdlab.distill.guards import StopRequest, apply_update, skip_nonfinite
from opdlab.distill.logging import MetricsLog, require_tensorboard, truncate_metrics
from opdlab.distill.losses import group_advantages
from opdlab.distill.precision import compute_precision, precision_note
from opdlab.distill.privileged import check_privileged, teacher_message, teacher_prompt_ids, teacher_view
from opdlab.distill.rollout import Rollout, roll_out, with_prompts
from opdlab.distill.sampling import row_seeds
from opdlab.distill.sources import PromptSource, prompt_source
from opdlab.distill.step import Batch, MicroBatchLoss, StepModels, accumulate_gradients, loss_function
from opdlab.distill.vllm_backend import VLLMRollout, require_vllm
from opdlab.distill.vlm import VisualRollout, encode_visual_prompts, roll_out_visual
from opdlab.errors import UserError
from opdlab.fileio import write_text
from opdlab.models.compat import check_tokenizers
from opdlab.models.loading import Models, load_models, load_teacher
from opdlab.models.metadata import learned_position_limit
from opdlab.subnet.masks import fit_mask_to_model, load_mask, zero_grads_outside
from opdlab.subnet.optimizers import build_optimizer, clip_gradients
from opdlab.subnet.update_tracker import UpdateTracker

RollOut = Callable[[list[Any], list[int]], Batch]  # (this process's step examples, one seed per row) -> batch


@dataclass
class Run:
    """Everything the step loop reads, built once by `set_up`."""

    cfg: DistillConfig
    run_dir: Path
    ctx: DistContext
    models: StepModels
    tokenizer: Any  # saved with every checkpoint
    source: PromptSource
    named: list[tuple[str, torch.nn.Parameter]]  # the student's parameters, in optimizer order
    masks: dict[str, torch.Tensor] | None  # optim.mask: only these coordinates train
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    roll_out: RollOut
    advantages: Callable[[torch.Tensor | None], torch.Tensor | None]  # rewards [B] -> per-row advantages (rl)
    loss: MicroBatchLoss
    evaluate: Callable[[], dict[str, float]]
    first_step: int  # the last finished step: 0, or the checkpoint's step on resume
    info: dict[str, Any]  # run.json
    tracker: UpdateTracker | None = None  # run.track_update_every: the update against the source, measured


def train(cfg: DistillConfig, run_dir: Path, resume_from: Path | None = None, progress: bool = True) -> Path:
    """Run (or continue from `resume_from`, a checkpoint folder) and return `run_dir`.

    `run.threads` > 0 sets torch's thread count for the run; the caller's count is restored after.
    """
    threads = torch.get_num_threads()
    try:
        run = set_up(cfg, run_dir, resume_from)
        log = MetricsLog(run_dir, tensorboard=cfg.run.tensorboard, total_steps=cfg.run.steps,
                         first_step=run.first_step, progress=progress) if run.ctx.is_main else NullLog()
        stop = StopRequest.install()  # SIGINT/SIGTERM: finish this step, checkpoint it, exit (guards.py)
        try:
            run_steps(run, log, stop)
        finally:
            stop.restore()
            log.close()
        dist_ckpt.save_final(run.ctx, run_dir, run.models.student, run.tokenizer, cfg.run.save_dtype)
        if run.ctx.is_main:
            ckpt.write_run_info(run_dir, {**run.info, "status": "finished", "step": cfg.run.steps})
        return run_dir
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- load


def set_up(cfg: DistillConfig, run_dir: Path, resume_from: Path | None) -> Run:
    """Seed, load and check models and prompts, build the optimizer, restore a checkpoint, write config.yaml."""
    if cfg.run.tensorboard:
        require_tensorboard()
    if cfg.rollout.backend == "vllm":
        require_vllm()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    ctx = init_from_env(cfg.model.device)  # world size 1 unless launched by torchrun (opdlab.dist)
    note = precision_note(cfg.run.precision, cfg.model.device)
    if note and ctx.is_main:
        print(f"opdlab: {note}", file=sys.stderr)
    check_divisible(ctx, cfg.rollout.prompts_per_step)

    models = load_models(cfg.model, self_teacher=privileged_teacher(cfg))
    source = prompt_source(cfg, models.task, models.vlm)
    preflight(cfg, models, source)
    reference = None  # rl's KL penalty: the student's frozen source
    if cfg.method == "rl" and cfg.loss.rl_kl_coef > 0:
        reference = load_teacher(models.student_path, cfg.model.device, cfg.model.trust_remote_code)
    student = shard_model(ctx, models.student)  # FSDP2 under torchrun; unchanged at world size 1
    teacher = shard_model(ctx, models.teacher) if cfg.model.shard_teacher else models.teacher
    step_models = StepModels(student, teacher, reference, vocab_size(models.student), cfg.rollout.micro_batch)
    engine = None  # rollout.backend vllm: the student's samples come from a vLLM copy (opdlab.distill.vllm_backend)
    if cfg.rollout.backend == "vllm":
        engine = VLLMRollout(models.student_path, cfg.model.device, seed=cfg.run.seed)
    named = list(student.named_parameters())
    masks = None
    if cfg.optim.mask is not None:
        masks = shard_masks(fit_mask_to_model(load_mask(cfg.optim.mask)[0], named, cfg.optim.mask), named)
    optimizer = build_optimizer(named, cfg.optim, masks)
    # Compact gradients: none for frozen tensors, none stored dense for the others (not under FSDP2).
    compact = masks is not None and optimizer.reduce_gradients_in_backward()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.run.steps))
    run_eval = evaluation(cfg, models, step_models, source)

    first_step = 0
    if resume_from is not None:
        first_step = int(dist_ckpt.load_checkpoint(ctx, resume_from, student, optimizer, scheduler, masks)["step"])
        if ctx.is_main:
            truncate_metrics(run_dir, first_step)
    if compact:
        masks = None  # the optimizer holds them as indices; the bool tensors (1 byte a coordinate) are freed
    tracker = update_tracker(cfg, models.student_path, named, run_dir, first_step)
    info = {"status": "running", "method": cfg.method, "step": first_step, "steps": cfg.run.steps,
            "student": str(models.student_path), "teacher": str(models.teacher_path), "task": source.task}
    if ctx.is_main:  # files and progress: rank 0 only
        write_text(run_dir / "config.yaml", to_yaml(cfg))  # on resume: the continuing run's resolved config
        ckpt.write_run_info(run_dir, info)
    return Run(cfg=cfg, run_dir=run_dir, ctx=ctx, models=step_models, tokenizer=models.tokenizer, source=source,
               named=named, masks=masks, optimizer=optimizer, scheduler=scheduler,
               roll_out=rollout_function(cfg, models, step_models, engine), advantages=advantage_function(cfg),
               loss=loss_function(cfg.method, cfg.loss), evaluate=run_eval, first_step=first_step, info=info,
               tracker=tracker)


# ----------------------------------------------------------------------------- the loop


def run_steps(run: Run, log: MetricsLog | NullLog, stop: StopRequest) -> None:
    """Steps `first_step + 1` .. `run.steps`, each: roll out -> score -> loss -> step -> log -> checkpoint."""
    cfg, ctx = run.cfg, run.ctx
    precision = partial(compute_precision, cfg.run.precision, cfg.model.device)  # bf16-mixed: autocast (distill/precision.py)
    if run.first_step == 0 and cfg.run.eval_start:
        with precision():
            start = run.evaluate()
        log.write({"step": 0, **start})

    for step in range(run.first_step + 1, cfg.run.steps + 1):
        # ---- roll out: the student samples (opd, opsd, rl), or the teacher does (sft)
        t0 = time.perf_counter()
        examples = run.source.step_examples(step, cfg.rollout.prompts_per_step, cfg.run.seed)
        first, examples = ctx.shard(examples)  # this process's share; seeds follow the global index
        with precision():
            batch = run.roll_out(examples, row_seeds(cfg.run.seed, step, first, len(examples),
                                                     cfg.rollout.samples_per_prompt))
        num_tokens = int(ctx.all_sum(batch.num_tokens)[0])  # the whole step's completion tokens
        reward = rollout_correct(batch.completions, batch.examples) if has_answers(batch.examples) else None
        t_rollout = time.perf_counter() - t0

        # ---- score and loss: teacher and student on the same completion tokens, one micro-batch at a time
        with precision():  # the optimizer step below runs outside it, on the fp32 master weights
            loss_sum, kl_sum, t_score, t_update = accumulate_gradients(run.models, batch, run.loss, num_tokens,
                                                                       run.advantages(reward))
        loss_sum, kl_sum = ctx.all_sum(loss_sum, kl_sum)

        # ---- step
        t3 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        grad_norm, skipped = update(run, step, loss_sum)
        t_update += time.perf_counter() - t3

        # ---- log
        total = time.perf_counter() - t0
        t_rollout, t_score, t_update, total = ctx.all_max(t_rollout, t_score, t_update, total)
        row: dict[str, Any] = {
            "step": step, "train/loss": loss_sum, "train/reverse_kl": kl_sum,
            "train/reward": ctx.mean(reward) if reward is not None else None,
            "train/grad_norm": float(grad_norm), "train/lr": lr, "train/completion_tokens": num_tokens,
            "train/tokens_per_s": num_tokens / total if total > 0 else None,
            "time/rollout_s": t_rollout, "time/score_s": t_score, "time/update_s": t_update,
            "train/skipped_nonfinite": 1 if skipped else None,
        }
        if step == cfg.run.steps or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
            with precision():
                row.update(run.evaluate())  # held-out numbers in the run's own arithmetic
        if run.tracker is not None and step % cfg.run.track_update_every == 0:
            t4 = time.perf_counter()
            row.update(run.tracker.measure(step))
            row["time/update_tracking_s"] = time.perf_counter() - t4
        log.write({k: v for k, v in row.items() if v is not None})

        # ---- checkpoint
        stop_now = ctx.agree_stop(stop)  # a signal seen by any process stops all of them at this step
        if step == cfg.run.steps or (cfg.run.save_every and step % cfg.run.save_every == 0) or stop_now:
            save_step(run, step)
        if stop_now and step < cfg.run.steps:
            raise stop.interrupted(step, run.run_dir)


def update(run: Run, step: int, loss_sum: float) -> tuple[float, bool]:
    """Mask, clip and apply the accumulated gradient (unless non-finite: guards.py); (grad norm, skipped)."""
    if run.masks is not None:
        zero_grads_outside(run.named, run.masks)
    grad_norm = scalar(clip_gradients(run.named, run.optimizer, run.cfg.optim.grad_clip))  # compact gradients too
    skipped = skip_nonfinite(step, loss_sum, grad_norm, run.cfg.run.on_nonfinite, run.run_dir)  # NaN/inf: stop or skip
    if not skipped:  # optimizer.step(), and the weights checked finite after it
        apply_update(step, run.optimizer, run.named, run.cfg.optim.lr, run.run_dir,
                     (lambda flag: run.ctx.all_max(flag)[0]) if run.ctx.distributed else None)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def update_tracker(cfg: DistillConfig, source: Path, named: list[tuple[str, torch.nn.Parameter]], run_dir: Path,
                   first_step: int) -> UpdateTracker | None:
    """run.track_update_every's tracker; on resume it starts from the last saved mask snapshot, if any."""
    every = cfg.run.track_update_every
    if every <= 0:
        return None
    tracker = UpdateTracker(source, named, run_dir / "masks" if cfg.run.save_update_masks else None)
    last = run_dir / "masks" / f"step-{first_step // every * every}.safetensors"
    if first_step >= every and cfg.run.save_update_masks and last.is_file():
        tracker.resume_from(last)
    return tracker


def save_step(run: Run, step: int) -> None:
    """Checkpoint the student, optimizer, scheduler and RNG after `step`; run.json says how far it got."""
    cfg = run.cfg
    dist_ckpt.save_checkpoint(run.ctx, run.run_dir, step, run.models.student, run.tokenizer, run.optimizer,
                              run.scheduler, cfg.run.save_dtype,
                              {"data_position": step * cfg.rollout.prompts_per_step,
                               "param_names": [name for name, _ in run.named]}, cfg.run.keep_checkpoints)
    if run.ctx.is_main:
        ckpt.write_run_info(run.run_dir, {**run.info, "step": step})


# ----------------------------------------------------------------------------- choices made once, at set-up


def rollout_function(cfg: DistillConfig, models: Models, step_models: StepModels, engine: VLLMRollout | None) -> RollOut:
    """How each step's batch is written: by whom (the teacher for sft), with which sampler, for which pair."""
    writer = step_models.teacher if cfg.method == "sft" else step_models.student
    if models.vlm:
        processors = {"student": models.tokenizer, "teacher": models.teacher_tokenizer}
        if cfg.method == "sft":
            return partial(roll_out_visual_sft, cfg.rollout, processors, writer, models.student)
        return partial(roll_out_visual_batch, cfg.rollout, processors, writer)
    sample = engine.roll_out if engine is not None and writer is step_models.student else roll_out  # vllm: fresh weights
    text = partial(roll_out_text, cfg.rollout, models.tokenizer, writer, sample)
    if cfg.method == "opsd":
        return partial(roll_out_privileged, text, models.teacher_tokenizer, cfg.data.privileged_template)
    if cfg.method == "sft" and cfg.data.privileged_teacher:
        return partial(roll_out_sft_privileged, cfg.rollout, models.tokenizer, models.teacher_tokenizer, writer, sample,
                       cfg.data.privileged_template)
    return text


def roll_out_text(
    r: RolloutConfig, tokenizer: Any, writer: Any, sample: Callable[..., Rollout], examples: list[Any], seeds: list[int],
) -> Rollout:
    """A text batch written by `writer` through `sample` (HF `roll_out` or vLLM), one seeded generator per row."""
    return sample(writer, tokenizer, render_prompts(tokenizer, [ex.prompt for ex in examples]), examples,
                  samples=r.samples_per_prompt, max_new_tokens=r.max_new_tokens,
                  temperature=r.temperature, top_p=r.top_p, seeds=seeds)


def roll_out_privileged(text: RollOut, tokenizer: Any, template: str, examples: list[Any], seeds: list[int]) -> Rollout:
    """opsd: the student's batch, and the teacher's view of it: the same completions behind privileged prompts."""
    batch = text(examples, seeds)
    return replace(batch, teacher_view=teacher_view(batch, tokenizer, template))


def roll_out_sft_privileged(
    r: RolloutConfig, tokenizer: Any, teacher_tokenizer: Any, teacher: Any, sample: Callable[..., Rollout],
    template: str, examples: list[Any], seeds: list[int],
) -> Rollout:
    """sft with data.privileged_teacher: the source writes behind its privileged prompts (the teacher's view);
    the student reads the same completion tokens behind its plain prompts."""
    written = sample(teacher, teacher_tokenizer, teacher_prompt_ids(teacher_tokenizer, examples, template), examples,
                     samples=r.samples_per_prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                     top_p=r.top_p, seeds=seeds)
    plain = render_prompts(tokenizer, [ex.prompt for ex in written.examples])
    return replace(with_prompts(written, plain, tokenizer.pad_token_id), teacher_view=written)


def roll_out_visual_batch(
    r: RolloutConfig, processors: dict[str, Any], writer: Any, examples: list[Any], seeds: list[int],
) -> VisualRollout:
    """A VLM batch written by the student, with every role's own prompt inputs.

    `seeds` are not used: VLM sampling draws from torch's global RNG, which checkpoints save.
    """
    return roll_out_visual(writer, processors, examples, samples=r.samples_per_prompt,
                           max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)


def roll_out_visual_sft(
    r: RolloutConfig, processors: dict[str, Any], teacher: Any, student: Any, examples: list[Any], seeds: list[int],
) -> VisualRollout:
    """sft on a VLM pair: the teacher writes through its own prompt inputs; the student reads the same tokens
    through its own. `seeds` are not used (as in `roll_out_visual_batch`)."""
    batch = roll_out_visual(teacher, {"student": processors["teacher"]}, examples, samples=r.samples_per_prompt,
                            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
    device = next(student.parameters()).device
    own = encode_visual_prompts(processors["student"], examples, r.samples_per_prompt).to(device)
    batch.prompts = {"student": own, "teacher": batch.prompts["student"]}
    return batch


def advantage_function(cfg: DistillConfig) -> Callable[[torch.Tensor | None], torch.Tensor | None]:
    """rl: GRPO advantages of each prompt's group of samples; the other methods weigh no row by reward."""
    if cfg.method == "rl":
        return partial(group_advantages, group_size=cfg.rollout.samples_per_prompt)
    return no_advantages


def no_advantages(reward: torch.Tensor | None) -> None:
    """The advantages of a method that does not learn from rewards: none."""
    return None


def evaluation(cfg: DistillConfig, models: Models, step_models: StepModels, source: PromptSource
               ) -> Callable[[], dict[str, float]]:
    """The held-out evaluation of this run (greedy accuracy, reverse KL), ready to call."""
    student, teacher, examples = step_models.student, step_models.teacher, source.eval_examples
    kwargs: dict[str, Any] = dict(max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.micro_batch,
                                  vocab_size=step_models.vocab_size, chunk=cfg.loss.vocab_chunk)
    if models.vlm:
        processors = {"student": models.tokenizer, "teacher": models.teacher_tokenizer}
        return partial(evaluate_visual, student, teacher, processors, examples, **kwargs)
    tok = models.tokenizer
    privileged_ids = (teacher_prompt_ids(models.teacher_tokenizer, examples, cfg.data.privileged_template)
                      if privileged_teacher(cfg) else None)
    return partial(evaluate, student, teacher, tok, examples, render_prompts(tok, [ex.prompt for ex in examples]),
                   teacher_prompt_ids=privileged_ids, **kwargs)


# ----------------------------------------------------------------------------- checks


def preflight(cfg: DistillConfig, models: Models, source: PromptSource) -> None:
    """Checks before step 1: tokenizers agree, prompts fit, rl has answers to reward."""
    # A VLM pair's `tokenizer`s are processors: compare the tokenizers inside them.
    student_tok, teacher_tok = (getattr(t, "tokenizer", t) if models.vlm else t
                                for t in (models.tokenizer, models.teacher_tokenizer))
    check_tokenizers(student_tok, teacher_tok, vocab_size(models.student), vocab_size(models.teacher),
                     str(models.student_path), str(models.teacher_path))
    if models.vlm:
        if privileged_teacher(cfg):
            raise UserError("method opsd: not supported for vision-language pairs yet; use opd with a teacher")
        if cfg.data.prompts is None and (not source.task or source.task not in visual_task_names()):
            raise UserError(f"task {source.task!r}: a VLM pair needs a visual task ({', '.join(visual_task_names())})")
        if cfg.rollout.backend != "hf":
            raise UserError("rollout.backend vllm: not supported for VLM pairs; use rollout.backend=hf")
        return  # image tokens are not in a text-only length check; built-in prompts are short
    # Learned absolute positions (GPT-2 style) end at a fixed table: prompt plus completion must fit.
    new = cfg.rollout.max_new_tokens
    student_room, teacher_room = (None if limit is None else (limit, new, f"the {role} model ({path})")
                                  for limit, role, path in ((learned_position_limit(models.student), "student",
                                                             models.student_path),
                                                            (learned_position_limit(models.teacher), "teacher",
                                                             models.teacher_path)))
    for examples, where in source.checks:
        check_prompt_lengths(examples, models.tokenizer, cfg.data.max_prompt_tokens, where, student_room)
        if teacher_room is not None and not privileged_teacher(cfg):  # a privileged teacher: its own prompt, below
            check_prompt_lengths(examples, models.teacher_tokenizer, cfg.data.max_prompt_tokens, where, teacher_room)
    if privileged_teacher(cfg):
        for examples, where in source.checks:
            check_privileged(examples, where, cfg.data.privileged_field)
            privileged = [replace(ex, prompt=teacher_message(ex, cfg.data.privileged_template)) for ex in examples]
            try:
                check_prompt_lengths(privileged, models.teacher_tokenizer, cfg.data.max_prompt_tokens, where,
                                     teacher_room)
            except UserError as exc:
                raise UserError(f"{exc} (the teacher's privileged prompt: template plus privileged text)") from None
    if cfg.method == "rl" and not has_answers(source.eval_examples + (source.pool or [])):
        raise UserError(f"{cfg.data.prompts}: method rl needs a reward: every record needs the answer field "
                        f"'{cfg.data.answer_field}'")


def privileged_teacher(cfg: DistillConfig) -> bool:
    """The teacher is the student's frozen source reading privileged prompts: method opsd, and methods sft
    and rl with data.privileged_teacher (the baselines of a self-distillation study)."""
    return cfg.method == "opsd" or (cfg.method in ("sft", "rl") and cfg.data.privileged_teacher)


def vocab_size(model: Any) -> int:
    """Vocabulary rows of a model's language head (a VLM keeps them in its text config)."""
    return int(model.config.get_text_config().vocab_size)



# ----------------------------------------------------------------------------- schedule


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr for optimizer step index s = 0, 1, ... (linear warmup, then flat or cosine)."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor
