"""Sparsity: planted changes with known answers, thresholds, bf16 rounding."""

import pytest
import torch

from opdlab.analysis.metrics_sparsity import (
    changed_mask,
    sparsity_count_keys,
    sparsity_counts,
    sparsity_ratios,
    update,
)


def _planted(frac: float, shape=(200, 100), seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape).bfloat16()
    n = w.numel()
    idx = torch.randperm(n)[: int(round(frac * n))]
    tuned = w.clone().flatten()
    # +0.5 always survives bf16 rounding for |w| < 64 (randn values are far smaller).
    tuned[idx] = (tuned[idx].float() + 0.5).bfloat16()
    return w, tuned.view(shape), idx


def test_exactly_ten_percent_changed_gives_sparsity_point_nine():
    w, tuned, idx = _planted(0.10)
    u = changed_mask(w, tuned, atol=0.0)
    assert u.dtype == torch.bool and u.shape == w.shape
    assert int(u.sum()) == idx.numel()
    delta = update(w, tuned)
    sums = {"numel": float(w.numel()), **sparsity_counts(delta, rms_source=float(w.float().pow(2).mean().sqrt()))}
    assert sparsity_ratios(sums)["sparsity"] == pytest.approx(0.9, abs=1e-12)


def test_atol_threshold_is_strict():
    src = torch.zeros(4)
    tuned = torch.tensor([0.0, 1e-6, 2e-5, -3e-5])
    assert changed_mask(src, tuned, 0.0).tolist() == [False, True, True, True]
    assert changed_mask(src, tuned, 1e-5).tolist() == [False, False, True, True]
    assert changed_mask(src, tuned, 2e-5).tolist() == [False, False, False, True]


def test_delta_is_fp32_and_exact_for_bf16():
    a = torch.tensor([1.0, 256.0]).bfloat16()
    b = torch.tensor([1.0078125, 258.0]).bfloat16()  # one bf16 ULP above each
    d = update(a, b)
    assert d.dtype == torch.float32 and d.tolist() == [0.0078125, 2.0]


def test_curves_count_hand_made_values():
    delta = torch.tensor([0.0, 5e-9, 5e-8, 5e-7, 5e-6, 5e-5, 5e-4])
    c = sparsity_counts(delta, rms_source=1.0)
    assert set(c) == set(sparsity_count_keys())
    assert c["changed"] == 6 and c["changed_atol_1e-05"] == 2
    assert [c[f"n_below_eps_{e}"] for e in ("1e-08", "1e-07", "1e-06", "1e-05", "1e-04")] == [2, 3, 4, 5, 6]
    # rms(W) = 1 → τ thresholds are 1e-4, 1e-3, 1e-2
    assert [c[f"n_below_rms_{t}"] for t in ("1e-04", "1e-03", "1e-02")] == [6, 7, 7]


def test_counts_of_row_blocks_add_up():
    w, tuned, _ = _planted(0.3, seed=3)
    delta = update(w, tuned)
    rms = float(w.float().pow(2).mean().sqrt())
    whole = sparsity_counts(delta, rms)
    parts = [sparsity_counts(b, rms) for b in delta.split(37)]
    assert {k: sum(p[k] for p in parts) for k in whole} == whole


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        changed_mask(torch.zeros(2, 3), torch.zeros(3, 2), 0.0)
