"""The training loop for all three methods: load -> roll out -> score -> loss -> step -> log -> checkpoint.

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

Vision-language pairs (`models.vlm`, docs/vlm.md) run the same loop: rollouts come from
`roll_out_visual` (each model's own processor), the teacher scores with `score_visual` and the
student's logits come from `rollout_logits`; only the batch type differs.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from opdlab.config import DistillConfig, to_yaml
from opdlab.data.prompts import check_prompt_lengths, render_prompts
from opdlab.data.visual_tasks import visual_task_names
from opdlab.dist.fsdp import shard_masks, shard_model
from opdlab.dist.runtime import NullLog, check_divisible, init_from_env, scalar
from opdlab.distill import checkpoint as ckpt
from opdlab.distill import sharded_checkpoint as dist_ckpt
from opdlab.distill.evaluate import evaluate, evaluate_visual, has_answers, rollout_correct
from opdlab.distill.guards import StopRequest, skip_nonfinite
from opdlab.distill.logging import MetricsLog, require_tensorboard, truncate_metrics
from opdlab.distill.losses import (
    group_advantages, kl_to_reference, log_softmax_chunked, opd_loss, policy_gradient_loss, reverse_kl,
    sampled_token_logprobs, sft_loss, token_mean,
)
from opdlab.distill.privileged import check_privileged, teacher_message, teacher_prompt_ids, teacher_view
from opdlab.distill.rollout import Rollout, completion_logits, roll_out, score
from opdlab.distill.sampling import row_seeds
from opdlab.distill.sources import PromptSource, prompt_source
from opdlab.distill.vllm_backend import VLLMRollout, require_vllm
from opdlab.distill.vlm import VisualRollout, encode_visual_prompts, roll_out_visual, rollout_logits, score_visual
from opdlab.errors import UserError
from opdlab.fileio import write_text
from opdlab.models.compat import check_tokenizers
from opdlab.models.loading import Models, load_models, load_teacher
from opdlab.subnet.masks import fit_mask_to_model, load_mask, zero_grads_outside
from opdlab.subnet.optimizers import build_optimizer, clip_gradients

# ----------------------------------------------------------------------------- checks


def preflight(cfg: DistillConfig, models: Models, source: PromptSource) -> None:
    """Checks before step 1: tokenizers agree, prompts fit, rl has answers to reward."""
    # A VLM pair's `tokenizer`s are processors: compare the tokenizers inside them.
    student_tok, teacher_tok = (getattr(t, "tokenizer", t) if models.vlm else t
                                for t in (models.tokenizer, models.teacher_tokenizer))
    check_tokenizers(student_tok, teacher_tok, vocab_size(models.student), vocab_size(models.teacher),
                     str(models.student_path), str(models.teacher_path))
    if models.vlm:
        if cfg.method == "opsd":
            raise UserError("method opsd: not supported for vision-language pairs yet; use opd with a teacher")
        if cfg.data.prompts is None and (not source.task or source.task not in visual_task_names()):
            raise UserError(f"task {source.task!r}: a VLM pair needs a visual task ({', '.join(visual_task_names())})")
        if cfg.rollout.backend != "hf":
            raise UserError("rollout.backend vllm: not supported for VLM pairs; use rollout.backend=hf")
        return  # image tokens are not in a text-only length check; built-in prompts are short
    for examples, where in source.checks:
        check_prompt_lengths(examples, models.tokenizer, cfg.data.max_prompt_tokens, where)
    if cfg.method == "opsd":
        for examples, where in source.checks:
            check_privileged(examples, where, cfg.data.privileged_field)
            privileged = [replace(ex, prompt=teacher_message(ex, cfg.data.privileged_template)) for ex in examples]
            try:
                check_prompt_lengths(privileged, models.teacher_tokenizer, cfg.data.max_prompt_tokens, where)
            except UserError as exc:
                raise UserError(f"{exc} (the teacher's privileged prompt: template plus privileged text)") from None
    if cfg.method == "rl" and not has_answers(source.eval_examples + (source.pool or [])):
        raise UserError(f"{cfg.data.prompts}: method rl needs a reward: every record needs the answer field "
                        f"'{cfg.data.answer_field}'")


def vocab_size(model: Any) -> int:
    """Vocabulary rows of a model's language head (a VLM keeps them in its text config)."""
    return int(model.config.get_text_config().vocab_size)


def roll_out_batch(
    cfg: DistillConfig, models: Models, writer: Any, examples: list[Any], seeds: list[int] | None,
    sample: Callable[..., Rollout] = roll_out,
) -> Rollout | VisualRollout:
    """The step's rollout batch, written by `writer` (the student, or the teacher for sft)."""
    r = cfg.rollout
    if not models.vlm:
        tok = models.tokenizer
        return sample(writer, tok, render_prompts(tok, [ex.prompt for ex in examples]), examples,
                      samples=r.samples_per_prompt, max_new_tokens=r.max_new_tokens,
                      temperature=r.temperature, top_p=r.top_p, seeds=seeds)
    processors = {"student": models.tokenizer, "teacher": models.teacher_tokenizer}
    kwargs = dict(samples=r.samples_per_prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
    if cfg.method != "sft":
        return roll_out_visual(writer, processors, examples, **kwargs)  # draws from torch's global (checkpointed) RNG
    # sft: the teacher writes through its own prompt inputs; the student then reads the same tokens through its own.
    batch = roll_out_visual(writer, {"student": processors["teacher"]}, examples, **kwargs)
    device = next(models.student.parameters()).device
    own = encode_visual_prompts(processors["student"], examples, r.samples_per_prompt).to(device)
    batch.prompts = {"student": own, "teacher": batch.prompts["student"]}
    return batch


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


# ----------------------------------------------------------------------------- one micro-batch


def micro_batch_loss(
    cfg: DistillConfig,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mb: Rollout,
    num_tokens: int,
    advantages: torch.Tensor | None,
    reference_logits: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reverse-KL statistic) of one micro-batch, both normalized by the step's `num_tokens`."""
    y, mask, chunk = mb.targets_BC, mb.mask_BC, cfg.loss.vocab_chunk
    if cfg.method in ("opd", "opsd"):
        loss, stats = opd_loss(cfg.loss.loss, student_logits, teacher_logits, y, mask, num_tokens,
                               beta=cfg.loss.beta, top_k=cfg.loss.top_k, chunk=chunk)
        return loss, stats["reverse_kl"]
    logp_s = log_softmax_chunked(student_logits, chunk, mask)
    with torch.no_grad():
        logp_t = log_softmax_chunked(teacher_logits, chunk, mask)
        kl = token_mean(reverse_kl(logp_s.detach(), logp_t, mask), mask, num_tokens)
    if cfg.method == "sft":
        return sft_loss(logp_s, y, mask, num_tokens), kl
    assert advantages is not None
    logp_y = sampled_token_logprobs(logp_s, y)
    loss = policy_gradient_loss(logp_y, advantages, mask, num_tokens)
    if reference_logits is not None:
        ref_y = sampled_token_logprobs(log_softmax_chunked(reference_logits, chunk, mask), y)
        loss = loss + cfg.loss.rl_kl_coef * token_mean(kl_to_reference(logp_y, ref_y, mask), mask, num_tokens)
    return loss, kl


def accumulate_gradients(
    cfg: DistillConfig, student: Any, teacher: Any, reference: Any, batch: Rollout | VisualRollout,
    advantages: torch.Tensor | None, vocab: int, num_tokens: int | None = None,
    teacher_batch: Rollout | None = None,
) -> tuple[float, float, float, float]:
    """Backward every micro-batch of the step; return (loss, reverse KL, score seconds, update seconds).

    Each micro-batch's loss is already divided by the completion tokens of the whole step, so
    the accumulated gradient and the summed loss are those of one big batch. `num_tokens`: the
    step's completion tokens over all processes (default: this batch's). `teacher_batch`: the
    teacher's own view of the same completions (opsd: privileged prompts), default `batch`.
    """
    num_tokens = int(batch.completion_mask_BT.sum()) if num_tokens is None else num_tokens
    size = cfg.rollout.micro_batch
    loss_sum = kl_sum = t_score = t_update = 0.0
    for start in range(0, len(batch.examples), size):
        t0 = time.perf_counter()
        mb = batch.rows(start, start + size)
        if isinstance(mb, VisualRollout):  # each model through its own processor's prompt inputs
            teacher_logits = score_visual(teacher, mb, vocab)
            reference_logits = score_visual(reference, mb, vocab, role="student") if reference is not None else None
        else:
            teacher_logits = score(teacher, teacher_batch.rows(start, start + size) if teacher_batch else mb, vocab)
            reference_logits = score(reference, mb, vocab) if reference is not None else None
        t1 = time.perf_counter()
        if isinstance(mb, VisualRollout):
            student_logits = rollout_logits(student, mb, "student", vocab)
        else:
            student_logits = completion_logits(student, mb, vocab)  # the one student forward of this micro-batch
        mb_adv = advantages[start:start + size].to(student_logits.device) if advantages is not None else None
        loss, kl = micro_batch_loss(cfg, student_logits, teacher_logits, mb, num_tokens, mb_adv, reference_logits)
        loss.backward()
        loss_sum, kl_sum = loss_sum + float(loss.detach()), kl_sum + float(kl)
        t_score, t_update = t_score + (t1 - t0), t_update + (time.perf_counter() - t1)
    return loss_sum, kl_sum, t_score, t_update


# ----------------------------------------------------------------------------- the loop


def train(cfg: DistillConfig, run_dir: Path, resume_from: Path | None = None, progress: bool = True) -> Path:
    """Run (or continue from `resume_from`, a checkpoint folder) and return `run_dir`.

    `run.threads` > 0 sets torch's thread count for the run; the caller's count is restored after.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, run_dir, resume_from, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: DistillConfig, run_dir: Path, resume_from: Path | None, progress: bool) -> Path:
    if cfg.run.tensorboard:
        require_tensorboard()
    if cfg.rollout.backend == "vllm":
        require_vllm()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    ctx = init_from_env(cfg.model.device)  # world size 1 unless launched by torchrun (opdlab.dist)
    check_divisible(ctx, cfg.rollout.prompts_per_step)

    # ---- load
    models = load_models(cfg.model, self_teacher=cfg.method == "opsd")
    student, teacher, tok = models.student, models.teacher, models.tokenizer
    source = prompt_source(cfg, models.task, models.vlm)
    preflight(cfg, models, source)
    vocab = vocab_size(student)
    reference = None
    if cfg.method == "rl" and cfg.loss.rl_kl_coef > 0:
        reference = load_teacher(models.student_path, cfg.model.device, cfg.model.trust_remote_code)
    student = shard_model(ctx, student)  # FSDP2 under torchrun; unchanged at world size 1
    teacher = shard_model(ctx, teacher) if cfg.model.shard_teacher else teacher
    engine = None  # rollout.backend vllm: the student's samples come from a vLLM copy (opdlab.distill.vllm_backend)
    if cfg.rollout.backend == "vllm":
        engine = VLLMRollout(models.student_path, cfg.model.device, seed=cfg.run.seed)
    named = list(student.named_parameters())
    masks = None
    if cfg.optim.mask is not None:
        masks = shard_masks(fit_mask_to_model(load_mask(cfg.optim.mask)[0], named, cfg.optim.mask), named)
    optimizer = build_optimizer(named, cfg.optim, masks)
    if masks is not None:  # no gradient for frozen tensors, none stored dense for the others (not under FSDP2)
        optimizer.reduce_gradients_in_backward()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.run.steps))
    eval_kwargs = dict(max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.micro_batch,
                       vocab_size=vocab, chunk=cfg.loss.vocab_chunk)
    if models.vlm:
        processors = {"student": tok, "teacher": models.teacher_tokenizer}
        run_eval = lambda: evaluate_visual(student, teacher, processors, source.eval_examples, **eval_kwargs)  # noqa: E731
    else:
        eval_prompt_ids = render_prompts(tok, [ex.prompt for ex in source.eval_examples])
        eval_kwargs["teacher_prompt_ids"] = (teacher_prompt_ids(models.teacher_tokenizer, source.eval_examples,
                                                                cfg.data.privileged_template)
                                             if cfg.method == "opsd" else None)
        run_eval = lambda: evaluate(student, teacher, tok, source.eval_examples, eval_prompt_ids, **eval_kwargs)  # noqa: E731

    first_step = 0
    if resume_from is not None:
        first_step = int(dist_ckpt.load_checkpoint(ctx, resume_from, student, optimizer, scheduler, masks)["step"])
        if ctx.is_main:
            truncate_metrics(run_dir, first_step)
    info = {"status": "running", "method": cfg.method, "step": first_step, "steps": cfg.run.steps,
            "student": str(models.student_path), "teacher": str(models.teacher_path), "task": source.task}
    if ctx.is_main:  # files and progress: rank 0 only
        write_text(run_dir / "config.yaml", to_yaml(cfg))  # on resume: the continuing run's resolved config
        ckpt.write_run_info(run_dir, info)
    log = MetricsLog(run_dir, tensorboard=cfg.run.tensorboard, total_steps=cfg.run.steps,
                     first_step=first_step, progress=progress) if ctx.is_main else NullLog()
    stop = StopRequest.install()  # SIGINT/SIGTERM: finish this step, checkpoint it, exit (guards.py)
    try:
        if first_step == 0:
            log.write({"step": 0, **run_eval()})

        for step in range(first_step + 1, cfg.run.steps + 1):
            # ---- roll out: the student samples (opd, rl), or the teacher does (sft)
            t0 = time.perf_counter()
            examples = source.step_examples(step, cfg.rollout.prompts_per_step, cfg.run.seed)
            first, examples = ctx.shard(examples)  # this process's share; seeds follow the global index
            writer = teacher if cfg.method == "sft" else student
            sample = engine.roll_out if engine is not None and writer is student else roll_out  # vllm: fresh weights
            batch = roll_out_batch(cfg, models, writer, examples,
                                   row_seeds(cfg.run.seed, step, first, len(examples), cfg.rollout.samples_per_prompt), sample)
            num_tokens = int(ctx.all_sum(int(batch.completion_mask_BT.sum()))[0])  # the whole step's tokens
            reward = rollout_correct(batch.completions, batch.examples) if has_answers(batch.examples) else None
            advantages = group_advantages(reward, cfg.rollout.samples_per_prompt) if cfg.method == "rl" else None
            # opsd: the teacher reads the same completions behind privileged prompts
            privileged = teacher_view(batch, models.teacher_tokenizer, cfg.data.privileged_template) \
                if cfg.method == "opsd" else None
            t_rollout = time.perf_counter() - t0

            # ---- score and loss: teacher and student on the same completion tokens, one micro-batch at a time
            loss_sum, kl_sum, t_score, t_update = accumulate_gradients(cfg, student, teacher, reference, batch,
                                                                       advantages, vocab, num_tokens, privileged)
            loss_sum, kl_sum = ctx.all_sum(loss_sum, kl_sum)

            # ---- step
            t3 = time.perf_counter()
            if masks is not None:
                zero_grads_outside(named, masks)
            grad_norm = scalar(clip_gradients(named, optimizer, cfg.optim.grad_clip))  # compact gradients too
            lr = optimizer.param_groups[0]["lr"]
            skipped = skip_nonfinite(step, loss_sum, grad_norm, cfg.run.on_nonfinite, run_dir)  # NaN/inf: stop or skip
            if not skipped:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
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
                row.update(run_eval())
            log.write({k: v for k, v in row.items() if v is not None})

            # ---- checkpoint
            stop_now = ctx.agree_stop(stop)  # a signal seen by any process stops all of them at this step
            if step == cfg.run.steps or (cfg.run.save_every and step % cfg.run.save_every == 0) or stop_now:
                dist_ckpt.save_checkpoint(ctx, run_dir, step, student, tok, optimizer, scheduler, cfg.run.save_dtype,
                                          {"data_position": step * cfg.rollout.prompts_per_step,
                                           "param_names": [name for name, _ in named]}, cfg.run.keep_checkpoints)
                if ctx.is_main:
                    ckpt.write_run_info(run_dir, {**info, "step": step})
            if stop_now and step < cfg.run.steps:
                raise stop.interrupted(step, run_dir)
    finally:
        stop.restore()
        log.close()

    dist_ckpt.save_final(ctx, run_dir, student, tok, cfg.run.save_dtype)
    if ctx.is_main:
        ckpt.write_run_info(run_dir, {**info, "status": "finished", "step": cfg.run.steps})
    return run_dir
