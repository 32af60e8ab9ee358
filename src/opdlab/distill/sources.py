"""Where a training run's prompts come from: a built-in task drawn per step, or a prompts file.

    source = prompt_source(cfg, default_task="sort")
    source.step_examples(step=3, n=16, seed=0)     # a pure function of (seed, step): resume needs no state
    source.eval_examples                           # the held-out prompts (same for every run seed)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from opdlab.config import DistillConfig
from opdlab.data.prompts import read_prompts
from opdlab.data.tasks import Example, get_task
from opdlab.data.visual_tasks import get_visual_task, visual_task_names
from opdlab.errors import UserError

# The held-out set does not depend on the run seed, so runs are compared on the same prompts. It is
# not the zoo's seed 0 either: the zoo picked its student by accuracy on that set.
EVAL_SEED = 1


def task_examples(name: str, n: int, seed: int, split: str) -> list[Any]:
    """`n` examples of the built-in task `name`: a text task, or a visual one (`shapes*`, with images)."""
    if name in visual_task_names():
        return get_visual_task(name).examples(n, seed=seed, split=split)  # type: ignore[arg-type]  # split checked there
    return get_task(name).examples(n, seed=seed, split=split)  # type: ignore[arg-type]


@dataclass
class PromptSource:
    """Where a step's prompts come from: a built-in task (drawn per step) or a fixed list (epochs).

    `checks` pairs each list of examples as read with the file it came from, for the
    pre-flight length check (line numbers must match the file).
    """

    task: str | None
    pool: list[Example] | None
    eval_examples: list[Example]
    checks: list[tuple[list[Example], str]]

    def step_examples(self, step: int, n: int, seed: int) -> list[Example]:
        """The `n` training examples of `step` (a pure function of seed and step)."""
        if self.pool is None:
            return task_examples(self.task or "", n, seed=seed * 1_000_003 + step, split="train")
        # Concatenated seeded permutations of the pool, one per epoch; step s takes items [(s-1)n, sn).
        orders: dict[int, list[int]] = {}
        out: list[Example] = []
        for i in range((step - 1) * n, step * n):
            epoch, pos = divmod(i, len(self.pool))
            if epoch not in orders:
                gen = torch.Generator().manual_seed(seed * 7919 + epoch)
                orders[epoch] = torch.randperm(len(self.pool), generator=gen).tolist()
            out.append(self.pool[orders[epoch][pos]])
        return out


def _read_file(path: str, cfg: DistillConfig, vlm: bool = False) -> list[Example]:
    """A prompts file's examples; records without a task get `data.task` (their checker), if given.

    For a vision-language pair every record also names an image (`data.image_field`).
    """
    examples = read_prompts(path, cfg.data.prompt_field, cfg.data.answer_field,
                            privileged_field=cfg.data.privileged_field, image_field=cfg.data.image_field if vlm else None)
    if vlm:
        if cfg.data.task:
            get_visual_task(cfg.data.task)  # an unknown name fails here, before any work
            examples = [ex if ex.task else replace(ex, task=cfg.data.task) for ex in examples]
        return examples
    if cfg.data.task:
        get_task(cfg.data.task)  # an unknown name fails here, before any work
        examples = [ex if ex.task else replace(ex, task=cfg.data.task) for ex in examples]
    return examples


def prompt_source(cfg: DistillConfig, default_task: str | None, vlm: bool = False) -> PromptSource:
    """Training and held-out prompts from a prompts file or a built-in task."""
    data = cfg.data
    task = data.task or default_task
    if data.prompts is None:
        if task is None:
            raise UserError("no prompts: pass --prompts FILE.jsonl (or --task NAME for a built-in task)")
        evals = task_examples(task, data.num_eval, seed=EVAL_SEED, split="eval")
        return PromptSource(task, None, evals, [(evals, f"task {task}")])
    pool = _read_file(data.prompts, cfg, vlm)
    checks = [(pool, data.prompts)]
    if data.eval_prompts is not None:
        evals = _read_file(data.eval_prompts, cfg, vlm)
        return PromptSource(task, pool, evals[: data.num_eval], checks + [(evals, data.eval_prompts)])
    # Hold out a seeded fifth (at most num_eval) of the file; a single prompt serves both roles.
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(EVAL_SEED)).tolist()
    n_eval = min(data.num_eval, len(pool) // 5) if len(pool) >= 5 else min(1, len(pool) - 1)
    evals = [pool[i] for i in order[:n_eval]]
    train_pool = [pool[i] for i in order[n_eval:]]
    return PromptSource(task, train_pool, evals or train_pool[:1], checks)
