"""Training the built-in vision-language pair from its spec's seed (`opdlab zoo build NAME --rebuild`).

    paths = build_or_train_vlm_pair("shapes-vlm-tiny", rebuild=True)   # retrain into the cache (~1-5 min)
    meta = train_vlm_pair(get_vlm_spec("shapes-vlm-tiny"), folder)     # or into any folder

The shipped weights (`opdlab/zoo_data/shapes-vlm-tiny/`) were made by `train_vlm_pair`;
`opdlab.models.vlm_zoo` copies them into the cache. How the pair is made (as for the text
pairs in `opdlab.recipes.zoo_train`):
1. One model is trained from scratch by SFT (loss on answer tokens + EOS) on `shapes-count`
   questions, so every part — vision tower, projector, language model — has weights with
   structure. Why counting only: colour-at-cell and position questions need two hops (read
   the question, then pick the matching image token); at this size they stayed at chance for
   300 steps (measured), while counting leaves chance within ~125 steps.
2. The *student* is the first evaluation at which greedy held-out accuracy reaches
   `student_min_accuracy` (stopped by accuracy, not time: when tiny models leave a plateau
   varies by seed).
3. The *teacher* is the same run trained further, to `teacher_min_accuracy` or `max_steps`.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch

from opdlab.data.visual_tasks import get_visual_task, visual_accuracy
from opdlab.distill.vlm import completion_logits, encode_visual_prompts, greedy_answers
from opdlab.errors import UserError
from opdlab.fileio import atomic_path, write_json
from opdlab.models.vlm_zoo import (
    VlmPairPaths, VlmPairSpec, build_processor, build_vlm_pair, get_vlm_spec, is_vlm_cached, model_config,
    shipped_vlm_dir, vlm_pair_dir,
)
from opdlab.models.zoo import METADATA_FILE


def build_or_train_vlm_pair(name: str, rebuild: bool = False, progress: bool = True) -> VlmPairPaths:
    """The cached VLM pair `name`: copied from the package, or trained from its seed with `rebuild`
    (or when no weights of its current spec ship and none are cached)."""
    spec = get_vlm_spec(name)
    if not rebuild and (is_vlm_cached(name) or shipped_vlm_dir(name) is not None):
        return build_vlm_pair(name)
    with atomic_path(vlm_pair_dir(name)) as tmp:
        meta = train_vlm_pair(spec, tmp, progress=progress)
        meta.update(versions=_versions(), machine=f"{platform.machine()}, {spec.threads} torch threads")
        write_json(tmp / METADATA_FILE, meta)
    return build_vlm_pair(name)  # cached now, from the current spec


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}



def encode_answers(tokenizer: Any, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer tokens + EOS, right-padded: ids [N, C] and mask [N, C] (1 on answer and EOS)."""
    seqs = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def vlm_accuracy(model: Any, processor: Any, examples: list[Any], max_new_tokens: int = 14) -> float:
    """Greedy exact-match accuracy of `model` on visual examples."""
    with torch.no_grad():
        return visual_accuracy(greedy_answers(model, processor, examples, max_new_tokens), examples)


def train_vlm_pair(spec: VlmPairSpec, folder: Path, progress: bool = True) -> dict[str, Any]:
    """Train the pair per `spec` into `folder` (student/, teacher/); return its metadata.

    SFT on answer tokens through the same scoring path OPD uses (`opdlab.distill.vlm`),
    so the pre-training exercises exactly the inputs distillation will see.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText

    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        processor = build_processor("llava", spec.image_size, spec.patch_size)
        tok = processor.tokenizer
        config = model_config(
            "llava", tok.get_vocab(), image_size=spec.image_size, patch_size=spec.patch_size,
            vision_hidden=spec.vision_hidden, vision_layers=spec.vision_layers, text_hidden=spec.text_hidden,
            text_layers=spec.text_layers, text_heads=spec.text_heads,
        )
        torch.manual_seed(spec.seed)
        model = AutoModelForImageTextToText.from_config(config)
        task = get_visual_task(spec.task)
        train = task.examples(spec.train_pool, spec.seed, "train")
        evals = task.examples(spec.num_eval, spec.seed, "eval")
        prompts = encode_visual_prompts(processor, train)
        answers_NC, answer_mask_NC = encode_answers(tok, [ex.answer for ex in train])
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / spec.warmup_steps))
        order = torch.Generator().manual_seed(spec.seed)
        student: dict[str, torch.Tensor] | None = None
        history: list[tuple[int, float]] = []
        student_step, student_acc, teacher_acc, step = -1, 0.0, 0.0, 0
        bar = tqdm(total=spec.max_steps, desc=f"zoo {spec.name}", disable=not progress)
        model.train()
        while step < spec.max_steps:
            idx = torch.randint(0, len(train), (spec.batch_size,), generator=order)
            mask_BC = answer_mask_NC[idx]
            logits_BCV = completion_logits(model, prompts.select(idx), answers_NC[idx], mask_BC)
            nll_BC = torch.nn.functional.cross_entropy(logits_BCV.transpose(1, 2), answers_NC[idx], reduction="none")
            loss = (nll_BC * mask_BC).sum() / mask_BC.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % spec.eval_every:
                continue
            acc = vlm_accuracy(model, processor, evals, spec.max_new_tokens)
            history.append((step, acc))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if student is None and acc >= spec.student_min_accuracy:
                student = {k: v.detach().clone() for k, v in model.state_dict().items()}
                student_step, student_acc = step, acc
            if student is not None and acc >= spec.teacher_min_accuracy:
                break
        bar.close()
        teacher_acc = history[-1][1] if history else 0.0
        if student is None or teacher_acc <= student_acc:
            raise UserError(
                f"zoo {spec.name}: training did not give a student (>= {spec.student_min_accuracy}) and a stronger "
                f"teacher in {spec.max_steps} steps (evals {history[-3:]}); try another seed"
            )
        folder.mkdir(parents=True, exist_ok=True)
        for role, weights in (("teacher", None), ("student", student)):
            if weights is not None:
                model.load_state_dict(weights)
            model.save_pretrained(folder / role)
            processor.save_pretrained(folder / role)
        return {
            "name": spec.name,
            "task": spec.task,
            "family": "llava",
            "spec": dataclasses.asdict(spec),
            "student": {"step": student_step, "eval_accuracy": student_acc},
            "teacher": {"step": step, "eval_accuracy": teacher_acc},
            "eval_history": history,
            "num_params": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
    finally:
        torch.set_num_threads(threads_before)
