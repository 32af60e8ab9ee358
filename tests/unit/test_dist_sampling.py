"""Seeded per-completion sampling (opdlab.dist.sampling) and the single-process runtime helpers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from opdlab.dist.runtime import DistContext
from opdlab.dist.sampling import SeededSampling, nucleus_filter, row_seeds
from opdlab.errors import UserError


def draw(logits_V: torch.Tensor, seeds: list[int], steps: int, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """argmax of the processor's scores for `steps` consecutive calls -> [rows, steps]."""
    proc = SeededSampling(seeds, temperature, top_p, "cpu")
    scores = logits_V.expand(len(seeds), -1)
    return torch.stack([proc(None, scores).argmax(dim=-1) for _ in range(steps)], dim=1)


def test_samples_follow_softmax_at_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    tokens = draw(logits, [7], 20_000, temperature=0.7).flatten()
    freq = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    expected = torch.softmax(logits.double() / 0.7, dim=0)
    # 4 standard errors of a binomial proportion at n = 20k.
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / tokens.numel()).sqrt() + 1e-12)


def test_a_row_does_not_depend_on_its_batch():
    """Row r's tokens are a function of its seed only: alone, or among other rows, in any position."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    seeds = row_seeds(3, step=5, first_prompt=0, num_prompts=4, samples=2)
    together = draw(logits, seeds, 12)
    for i, s in enumerate(seeds):
        assert torch.equal(draw(logits, [s], 12)[0], together[i])
    assert torch.equal(draw(logits, seeds[::-1], 12), together.flip(0))
    assert len({tuple(r.tolist()) for r in together}) > 1  # different seeds, different streams


def test_row_seeds_are_global_indices():
    """A rank holding prompts [2, 4) gets exactly the seeds the single process gives those rows."""
    everything = row_seeds(0, 1, 0, 4, 3)
    assert row_seeds(0, 1, 2, 2, 3) == everything[6:]
    assert len(set(everything)) == 12 and row_seeds(0, 2, 0, 4, 3) != everything


def test_nucleus_filter_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = nucleus_filter(probs.log(), 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75
    assert nucleus_filter(probs.log(), 0.1).isfinite().tolist() == [[True, False, False, False]]
    tokens = draw(probs.log()[0], [1, 2, 3], 40, top_p=0.75)
    assert set(tokens.unique().tolist()) == {0, 1}


def test_world_one_context_is_the_identity():
    ctx = DistContext()
    values = torch.tensor([1.0, 0.0, 1.0])
    assert ctx.shard(list("abcd")) == (0, list("abcd"))
    assert ctx.all_sum(0.1, 3) == [0.1, 3] and ctx.all_max(2.5) == [2.5]
    assert ctx.mean(values) == float(values.mean())
    assert ctx.run_on_main(lambda: 42) == 42
    assert DistContext(rank=1, world_size=2).shard(list("abcd")) == (2, ["c", "d"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: the error path cannot run")
def test_vllm_backend_without_vllm_is_one_line():
    from opdlab.dist.vllm_backend import require_vllm

    with pytest.raises(UserError, match=r"pip install 'opdlab\[vllm\]'") as info:
        require_vllm()
    assert "\n" not in str(info.value)
