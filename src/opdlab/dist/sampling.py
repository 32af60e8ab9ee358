"""Rank-consistent sampling: each completion draws from its own generator, seeded by (run seed, step, prompt, sample).

    seeds = row_seeds(run_seed=0, step=3, first_prompt=8, num_prompts=8, samples=4)   # 32 ints
    out = model.generate(..., do_sample=False, logits_processor=LogitsProcessorList([SeededSampling(seeds, 1.0, 1.0, dev)]))

Why: with `torch.multinomial` on the global RNG, which tokens a prompt gets depends on how many
rows were drawn before it — on the rank it landed on, the micro-batch, the batch width. Here
row r's t-th token uses the t-th draw of row r's own generator, so a prompt's completions are a
function of (seed, step, global prompt index, sample index) and the model only: the same on 1 or
N processes, and on resume (nothing to save). Sampling is exact: the Gumbel-max trick,
argmax(logits/T - log E) with E ~ Exp(1), picks token v with probability softmax(logits/T)_v.
The generator runs on the model's device, so CPU and GPU runs draw different (equally valid) samples.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def row_seed(run_seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one completion (a hash, so nearby indices give unrelated streams)."""
    digest = hashlib.blake2b(f"opdlab:{run_seed}:{step}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_seeds(run_seed: int, step: int, first_prompt: int, num_prompts: int, samples: int) -> list[int]:
    """Seeds of rows laid out as `roll_out` lays them out: prompt-major, `samples` adjacent rows each."""
    return [row_seed(run_seed, step, first_prompt + p, s) for p in range(num_prompts) for s in range(samples)]


def nucleus_filter(scores_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Scores with tokens outside the top-p nucleus set to -inf (the most likely token always stays).

    scores_BV: [B, V] logits already divided by the temperature -> [B, V].
    """
    if top_p >= 1.0:
        return scores_BV
    sorted_scores, order = torch.sort(scores_BV, dim=-1, descending=True)
    probs = sorted_scores.softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores_BV.masked_fill(drop, float("-inf"))


class SeededSampling:
    """A `generate` logits processor that turns greedy decoding into per-row seeded sampling.

    Use with `do_sample=False`: the returned scores are Gumbel-perturbed, so the greedy argmax
    is a sample at `temperature` (restricted to the top-p nucleus). Rows keep their position in
    the batch for the whole `generate` call (no beams), which is what ties row r to seed r.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device | str) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        if scores_BV.shape[0] != len(self.generators):
            raise ValueError(f"SeededSampling has {len(self.generators)} seeds for {scores_BV.shape[0]} rows")
        scores = nucleus_filter(scores_BV.double() / self.temperature, self.top_p)
        # float64 noise: a float32 uniform hits 0 (E = 0, an infinite boost) about once in 2**24 draws.
        noise = torch.empty_like(scores)
        for row, gen in enumerate(self.generators):
            noise[row].exponential_(generator=gen)
        return scores - noise.clamp_(min=torch.finfo(torch.float64).tiny).log()
