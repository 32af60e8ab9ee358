"""Training the built-in text pairs from their spec's seed (`opdlab zoo build NAME --rebuild`).

    paths = build_or_train_pair("sort-tiny", rebuild=True)   # retrain into the cache (a few minutes on 2 cores)
    meta = train_pair(get_spec("sort-tiny"), folder)          # or into any folder

The shipped weights (`opdlab/zoo_data/NAME/`) were made by `train_pair`; `opdlab.models.zoo`
copies them into the cache. How a pair is made, and where it deviates from the study:
1. One ~1 M-parameter Llama is trained from scratch by SFT (loss on completion tokens of
   chat-formatted examples) on a mixture of every task family, so its weights have real
   structure (random weights have no meaningful principal subspaces).
2. The *student source* is the first evaluation at which greedy held-out accuracy on the
   pair's distillation task reaches `student_min_accuracy`: stopped by accuracy, not by
   time, because when a tiny transformer leaves its loss plateau varies by seed.
3. The *teacher* is the same run trained further until `teacher_min_accuracy`: a stronger
   copy of the student, like the study's RL-improved (JustRL) teacher. A teacher from a
   separate run would differ from the student in more than skill (docs/zoo.md, "How the
   pairs were made").
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from opdlab.data.tasks import Example, accuracy, get_task
from opdlab.errors import UserError
from opdlab.fileio import atomic_path, write_json
from opdlab.models.tokenizer import build_tokenizer
from opdlab.models.zoo import (
    METADATA_FILE, PairPaths, PairSpec, build_pair, get_spec, is_cached, model_config, pair_dir, shipped_dir, spec_dict,
)


def build_or_train_pair(name: str, rebuild: bool = False, progress: bool = True) -> PairPaths:
    """The cached pair `name`: copied from the package, or trained from its seed with `rebuild`
    (or when no weights ship and none are cached)."""
    spec = get_spec(name)
    if not rebuild and (is_cached(name) or shipped_dir(name) is not None):
        return build_pair(name)
    with atomic_path(pair_dir(name)) as tmp:
        train_pair(spec, tmp, progress=progress)
    return build_pair(name)  # cached now, from the current spec


def _training_examples(spec: PairSpec) -> list[Example]:
    """`spec.train_pool` train-split examples, each family's share as in `spec.train_mix`."""
    out: list[Example] = []
    for name, share in spec.train_mix:
        out += get_task(name).examples(round(share * spec.train_pool), spec.seed, "train")
    return out  # batches are drawn uniformly from the pool, so order does not matter


def _encode(tok: Any, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted (prompt, answer) sequences, right-padded.

    Returns input_ids_NL and labels_NL (-100 except on answer tokens and the final EOS).
    """
    prompts = [tok.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False, add_generation_prompt=True) for e in examples]
    fulls = [
        tok.apply_chat_template([{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}], tokenize=False)
        for e in examples
    ]
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tok(fulls, add_special_tokens=False)["input_ids"]
    length = max(len(f) for f in full_ids)
    ids = torch.full((len(examples), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        assert f[: len(p)] == p, "chat template: the conversation must extend the generation prompt"
        ids[i, : len(f)] = torch.tensor(f)
        labels[i, len(p) : len(f)] = torch.tensor(f[len(p) :])
    return ids, labels


@torch.no_grad()
def greedy_accuracy(model: Any, tok: Any, examples: list[Example], max_new_tokens: int = 8, batch_size: int = 256) -> float:
    """Exact-match accuracy of greedy completions (chat-formatted prompts, left padding)."""
    return accuracy(greedy_completions(model, tok, examples, max_new_tokens, batch_size), examples)


@torch.no_grad()
def greedy_completions(model: Any, tok: Any, examples: list[Example], max_new_tokens: int = 8, batch_size: int = 256) -> list[str]:
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False, add_generation_prompt=True) for e in chunk]
        batch = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        gen = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        out += tok.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return out


def train_pair(spec: PairSpec, folder: Path, progress: bool = True) -> dict[str, Any]:
    """Train a pair per `spec` into `folder` (student/, teacher/, opdlab_pair.json); return the metadata."""
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    start, cpu_start = time.perf_counter(), time.process_time()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        tok = build_tokenizer()
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(model_config(spec, len(tok)))
        ids_NL, labels_NL = _encode(tok, _training_examples(spec))
        evals = get_task(spec.task).examples(spec.num_eval, spec.seed, "eval")
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=spec.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / spec.warmup_steps))
        order = torch.Generator().manual_seed(spec.seed)
        model.train()

        student: dict[str, torch.Tensor] | None = None
        history: list[tuple[int, float]] = []
        student_step, student_acc, teacher_acc = -1, 0.0, 0.0
        bar = tqdm(total=spec.max_steps, desc=f"zoo {spec.name}", disable=not progress)
        step = 0
        while step < spec.max_steps:
            idx = torch.randint(0, ids_NL.shape[0], (spec.batch_size,), generator=order)
            loss = model(input_ids=ids_NL[idx], labels=labels_NL[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            # Evaluate often near the student threshold (tiny models jump), rarely after.
            near = student is None and bool(history) and history[-1][1] >= spec.student_min_accuracy / 2
            every = spec.fine_eval_every if near else spec.eval_every
            if step % every:
                continue
            acc = greedy_accuracy(model, tok, evals)
            history.append((step, acc))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if progress:
                bar.write(f"step {step}: loss {loss.item():.3f}, {spec.task} eval accuracy {acc:.3f}")
            if student is None and acc >= spec.student_min_accuracy:
                student = {k: v.detach().clone() for k, v in model.state_dict().items()}
                student_step, student_acc = step, acc
            if student is not None and acc >= spec.teacher_min_accuracy:
                teacher_acc = acc
                break
        bar.close()
        if student is None or teacher_acc < spec.teacher_min_accuracy:
            raise UserError(
                f"zoo {spec.name}: training did not reach the target accuracies in {spec.max_steps} steps "
                f"(last eval {history[-1] if history else None}); try another seed"
            )
        teacher_step = step
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder / "teacher")
        tok.save_pretrained(folder / "teacher")
        model.load_state_dict(student)
        model.save_pretrained(folder / "student")
        tok.save_pretrained(folder / "student")
        build_seconds = time.perf_counter() - start
        meta = {
            "name": spec.name,
            "task": spec.task,
            "spec": spec_dict(spec),
            "student": {"step": student_step, "eval_accuracy": student_acc},
            "teacher": {"step": teacher_step, "eval_accuracy": teacher_acc},
            "eval_history": history,
            "num_params": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(build_seconds, 1),
            # CPU seconds / threads: the wall time on an otherwise idle machine (ours was shared).
            "build_cpu_seconds_per_thread": round((time.process_time() - cpu_start) / spec.threads, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
            "machine": f"{platform.machine()}, {spec.threads} torch threads",
        }
        write_json(folder / METADATA_FILE, meta)
        return meta
    finally:
        torch.set_num_threads(threads_before)
