"""Seeded per-completion sampling (opdlab.distill.sampling) and the single-process runtime helpers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from opdlab.dist.runtime import DistContext
from opdlab.distill.sampling import SeededSampling, inverse_cdf_sample, nucleus_filter, row_seeds, seeded_uniform
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


def splitmix64_reference(seed: int, count: int) -> list[int]:
    """The first `count` outputs of splitmix64 (Vigna's reference), in plain Python integers."""
    mask, state, out = (1 << 64) - 1, seed & ((1 << 64) - 1), []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_seeded_uniform_is_splitmix64_from_the_row_seed():
    """The int64 tensor hash (wrapping multiply, logical shifts) equals the unsigned reference bit for bit."""
    seeds = [0, 1, 12345, (1 << 63) - 1, *row_seeds(7, 2, 0, 3, 2)]
    seeds_B = torch.tensor(seeds, dtype=torch.int64)
    for position in range(4):
        got = seeded_uniform(seeds_B, position)
        want = [splitmix64_reference(s, position + 1)[-1] >> 11 for s in seeds]
        assert got.dtype == torch.float64
        assert (got * 2.0**53).long().tolist() == want
    # Known value: splitmix64 seeded with 0 starts 0xE220A8397B1DCDAF.
    assert splitmix64_reference(0, 1)[0] == 0xE220A8397B1DCDAF


def test_uniforms_are_uniform_and_unrelated_across_rows_and_positions():
    u = torch.stack([seeded_uniform(torch.arange(4000), t) for t in range(5)])  # [5, 4000], adjacent seeds
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u.flatten().float(), bins=10, min=0.0, max=1.0)
    expected = u.numel() / 10
    assert float(((counts - expected) ** 2 / expected).sum()) < 33.7  # chi-square, 9 dof, p = 1e-4
    assert float(torch.corrcoef(u).sub(torch.eye(5)).abs().max()) < 0.07  # positions: ~N(0, 1/4000) each


def test_inverse_cdf_matches_probabilities_chi_square():
    """60k rows drawn in one call (one seed each): token counts fit softmax(scores) including a -inf token."""
    logits = torch.tensor([1.5, 0.0, float("-inf"), -2.0, 0.7, 0.69, -0.5])
    n = 60_000
    tokens = inverse_cdf_sample(logits.expand(n, -1), seeded_uniform(torch.arange(n) * 7919 + 11, 0))
    counts = torch.bincount(tokens, minlength=7).double()
    assert counts[2] == 0  # excluded token never drawn
    expected = torch.softmax(logits.double(), dim=0) * n
    keep = expected > 0
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 25.7  # chi-square, 5 dof, p = 1e-4
    # Total variation: well inside what 60k draws can resolve (~0.005).
    assert float((counts / n - expected / n).abs().sum() / 2) < 0.01


def test_inverse_cdf_edges_land_on_possible_tokens():
    """u = 0 gives the first possible token and u just below 1 the last one, never an excluded one."""
    scores = torch.tensor([[float("-inf"), 0.0, 3.0, float("-inf")], [-50.0, float("-inf"), 5.0, 0.0]])
    lowest = inverse_cdf_sample(scores, torch.zeros(2, dtype=torch.float64))
    highest = inverse_cdf_sample(scores, torch.full((2,), 1.0 - 2.0**-53, dtype=torch.float64))
    assert lowest.tolist() == [1, 0] and highest.tolist() == [2, 3]


def test_same_seeds_same_tokens_and_positions_advance():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(1))
    seeds = row_seeds(0, 0, 0, 3, 2)
    first, again = draw(logits, seeds, 40), draw(logits, seeds, 40)
    assert torch.equal(first, again)
    assert len(set(first[0].tolist())) > 5  # a row's tokens change from position to position
    assert not torch.equal(draw(logits, row_seeds(1, 0, 0, 3, 2), 40), first)


def test_processor_output_is_one_hot_on_the_sample():
    proc = SeededSampling([5, 6], 0.5, 0.9, "cpu")
    scores = torch.randn(2, 11)
    out = proc(None, scores)
    assert out.dtype == scores.dtype and out.isfinite().sum(dim=-1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="2 seeds for 3 rows"):
        proc(None, torch.randn(3, 11))


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
    from opdlab.distill.vllm_backend import require_vllm

    with pytest.raises(UserError, match=r"pip install 'opdlab\[vllm\]'") as info:
        require_vllm()
    assert "\n" not in str(info.value)
