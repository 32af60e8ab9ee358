"""Overlap of changed masks: identical runs, independent random masks, hand-counted cases."""

import math

import pytest
import torch

from opdlab.analysis.metrics_overlap import add_counts, overlap_counts, overlap_stats


def test_hand_counted_case():
    a = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    c = overlap_counts(a, b)
    assert c == {"n": 10, "a": 3, "b": 4, "both": 2}
    s = overlap_stats(c)
    assert s["jaccard"] == pytest.approx(2 / 5)
    assert s["jaccard_random"] == pytest.approx(0.3 * 0.4 / (0.3 + 0.4 - 0.12))
    assert s["coverage_a"] == pytest.approx(2 / 3) and s["coverage_a_random"] == pytest.approx(0.4)
    assert s["coverage_b"] == pytest.approx(2 / 4) and s["coverage_b_random"] == pytest.approx(0.3)
    assert s["coverage_a_ratio"] == pytest.approx((2 / 3) / 0.4)
    assert s["density_a"] == pytest.approx(0.3) and s["density_b"] == pytest.approx(0.4)


def test_identical_masks_give_jaccard_one():
    torch.manual_seed(0)
    a = torch.rand(300, 200) < 0.1
    s = overlap_stats(overlap_counts(a, a.clone()))
    assert s["jaccard"] == 1.0 and s["coverage_a"] == 1.0 and s["coverage_b"] == 1.0
    assert s["jaccard_ratio"] == pytest.approx(1.0 / s["jaccard_random"])


def test_independent_random_masks_give_ratio_one():
    torch.manual_seed(1)
    a = torch.rand(1000, 1000) < 0.1
    b = torch.rand(1000, 1000) < 0.3
    s = overlap_stats(overlap_counts(a, b))
    # 1e6 coordinates: the chance overlap (3e4 expected) has a relative sd of ~0.6 %.
    assert s["jaccard_ratio"] == pytest.approx(1.0, abs=0.03)
    assert s["coverage_a_ratio"] == pytest.approx(1.0, abs=0.03)
    assert s["coverage_b_ratio"] == pytest.approx(1.0, abs=0.03)


def test_counts_add_across_tensors():
    torch.manual_seed(2)
    parts = [(torch.rand(50, 20) < 0.2, torch.rand(50, 20) < 0.5), (torch.rand(7) < 0.5, torch.rand(7) < 0.5)]
    total: dict = {}
    for a, b in parts:
        add_counts(total, overlap_counts(a, b))
    flat = overlap_counts(torch.cat([p[0].flatten() for p in parts]), torch.cat([p[1].flatten() for p in parts]))
    assert total == flat


def test_empty_masks_are_nan_not_errors():
    z = torch.zeros(5, dtype=torch.bool)
    s = overlap_stats(overlap_counts(z, z))
    assert math.isnan(s["jaccard"]) and math.isnan(s["coverage_a"]) and s["density_a"] == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        overlap_counts(torch.zeros(3, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
