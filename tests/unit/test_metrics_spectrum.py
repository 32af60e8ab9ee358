"""Spectrum of Δ: planted ranks, Gram vs LAPACK singular values, randomized vs exact."""

import math

import pytest
import torch

from opdlab.analysis.metrics_spectrum import (
    gram_singular_values,
    randomized_singular_values,
    spectrum_metrics,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x.T @ x


def test_planted_rank_four_measures_rank_four():
    torch.manual_seed(0)
    delta = (torch.randn(600, 4) @ torch.randn(4, 200)).float()
    sv = gram_singular_values(_gram(delta))
    m = spectrum_metrics(sv, float(delta.double().pow(2).sum()), 200, complete=True)
    # Tolerance 1e-6·σ₁: the fp64 Gram's noise floor is ~1e-8·σ₁, well below it.
    for tol in ("1e-06", "1e-05", "1e-04"):
        assert m[f"rank_fraction_tol_{tol}"] == pytest.approx(4 / 200)
    assert m["top4_energy"] == pytest.approx(1.0, abs=1e-9)
    assert m["top64_energy"] == pytest.approx(1.0, abs=1e-9)


def test_gram_values_match_lapack_svdvals():
    torch.manual_seed(1)
    x = torch.randn(300, 90) * torch.logspace(0, -3, 90)
    ref = torch.linalg.svdvals(x.double())
    got = gram_singular_values(_gram(x))
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-10 * float(ref[0]))


def test_hand_computed_diagonal_case():
    # σ = (3, 2, 1, 0): energy 14, stable rank 14/9, effective rank exp(H(3/6, 2/6, 1/6)).
    x = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    m = spectrum_metrics(gram_singular_values(_gram(x)), 14.0, 4, complete=True)
    assert m["rank_fraction_tol_1e-05"] == pytest.approx(3 / 4)
    assert m["top1_energy"] == pytest.approx(9 / 14) and m["top2_energy"] == pytest.approx(13 / 14)
    assert m["stable_rank"] == pytest.approx(14 / 9)
    p = [0.5, 1 / 3, 1 / 6]
    assert m["effective_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert m["top_10pct_sv_energy"] == pytest.approx(9 / 14)  # ⌈0.1·4⌉ = 1 value


def test_zero_update_is_nan():
    m = spectrum_metrics(torch.zeros(5, dtype=torch.float64), 0.0, 5, complete=True)
    assert all(math.isnan(v) for v in m.values())


def test_randomized_agrees_with_exact():
    """Stated tolerance: top-16 values within 1 % relative, top-k energies within 0.01 absolute,
    on a matrix with a decaying spectrum (σ_i ∝ i^-1) — the regime of real updates."""
    torch.manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(1500, 400))
    v, _ = torch.linalg.qr(torch.randn(400, 400))
    s = 1.0 / torch.arange(1, 401, dtype=torch.float32)
    delta = (u * s) @ v.T
    energy = float(delta.double().pow(2).sum())
    exact = gram_singular_values(_gram(delta))
    approx = randomized_singular_values(delta)
    assert approx.numel() == 64
    assert torch.allclose(approx[:16], exact[:16], rtol=1e-2)
    me = spectrum_metrics(exact, energy, 400, complete=True)
    ma = spectrum_metrics(approx, energy, 400, complete=False)
    for k in ("top1_energy", "top8_energy", "top64_energy", "stable_rank", "top_1pct_sv_energy"):
        assert ma[k] == pytest.approx(me[k], abs=1e-2, rel=1e-2), k
    # a full-rank Δ saturates the 64 values: the rank is unknown, not 64/400
    assert math.isnan(ma["rank_fraction_tol_1e-05"]) and math.isnan(ma["effective_rank"])
    assert math.isnan(ma["top_5pct_sv_energy"]) is False  # ⌈0.05·400⌉ = 20 ≤ 64
