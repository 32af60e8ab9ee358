"""Overlap of two changed masks against the chance overlap of independent masks (DESIGN 7).

Counts are integers that add up across tensors, so a group's or the whole model's
overlap is `overlap_stats` of summed counts — never an average of per-tensor ratios.

Example::

    c = overlap_counts(changed_a, changed_b)            # {'n', 'a', 'b', 'both'}
    overlap_stats(c)["jaccard_ratio"]                    # ≈ 1 for independent masks
"""

from __future__ import annotations

import math

import torch

COUNT_KEYS = ("n", "a", "b", "both")


def overlap_counts(mask_a: torch.Tensor, mask_b: torch.Tensor) -> dict[str, int]:
    """Integer counts of two same-shape bool masks.

    Args:
        mask_a, mask_b: bool tensors of identical shape (any rank).
    Returns:
        {"n": numel, "a": |A|, "b": |B|, "both": |A∩B|}.
    """
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"overlap_counts: mask shapes differ: {tuple(mask_a.shape)} vs {tuple(mask_b.shape)}")
    a, b = mask_a.bool(), mask_b.bool()
    return {
        "n": int(a.numel()),
        "a": int(a.sum()),
        "b": int(b.sum()),
        "both": int((a & b).sum()),
    }


def add_counts(total: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    """total += counts, key by key (in place; returns total)."""
    for k in COUNT_KEYS:
        total[k] = total.get(k, 0) + int(counts[k])
    return total


def _ratio(x: float, y: float) -> float:
    return x / y if y > 0 else math.nan


def overlap_stats(counts: dict[str, int]) -> dict[str, float]:
    """Jaccard and one-sided coverage, each with its independent-mask baseline and ratio.

    With densities p_A = |A|/n and p_B = |B|/n, two independent masks overlap in
    expectation on n·p_A·p_B coordinates, so the chance values are
    Jaccard p_A·p_B/(p_A+p_B−p_A·p_B), coverage of A (|A∩B|/|A|) p_B and coverage of B p_A.
    Undefined values (empty masks) are NaN.
    """
    n, a, b, both = (int(counts[k]) for k in COUNT_KEYS)
    p_a, p_b = _ratio(a, n), _ratio(b, n)
    union = a + b - both
    jaccard = _ratio(both, union)
    jaccard_random = _ratio(p_a * p_b, p_a + p_b - p_a * p_b)
    coverage_a = _ratio(both, a)
    coverage_b = _ratio(both, b)
    return {
        "jaccard": jaccard,
        "jaccard_random": jaccard_random,
        "jaccard_ratio": _ratio(jaccard, jaccard_random),
        "coverage_a": coverage_a,
        "coverage_a_random": p_b,
        "coverage_a_ratio": _ratio(coverage_a, p_b),
        "coverage_b": coverage_b,
        "coverage_b_random": p_a,
        "coverage_b_ratio": _ratio(coverage_b, p_a),
        "density_a": p_a,
        "density_b": p_b,
    }
