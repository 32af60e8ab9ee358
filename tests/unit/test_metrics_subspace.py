"""Principal-subspace energies: planted inside / orthogonal / Gaussian, Gram route vs explicit SVD."""

import pytest
import torch

from opdlab.analysis.metrics_subspace import rho_k, subspace_ratios, subspace_sums_direct, subspace_sums_gram


pytestmark = pytest.mark.usefixtures("one_thread")


def _gram_route(w: torch.Tensor, d: torch.Tensor) -> dict:
    m, n = w.shape
    tr = m < n
    wt, dt = (w.T, d.T) if tr else (w, d)
    wt, dt = wt.double(), dt.double()
    sums, _ = subspace_sums_gram(wt.T @ wt, wt.T @ dt, dt.T @ dt, m, n, tr)
    return subspace_ratios(sums)


def _svd(w):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u, s, vh.T


@pytest.mark.parametrize("shape", [(240, 100), (100, 240)])
def test_gram_route_equals_explicit_svd(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    d = 0.05 * torch.randn(shape, dtype=torch.float64)
    u, s, v = _svd(w)
    u2, s2, _ = _svd(w + d)
    ref = subspace_ratios(subspace_sums_direct(d, u, s, v, u2, s2))
    got = _gram_route(w, d)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


def test_delta_inside_top_subspaces_has_energy_one_and_orthogonal_zero():
    torch.manual_seed(1)
    w = torch.randn(300, 200, dtype=torch.float64)
    u, s, v = _svd(w)
    k = rho_k(0.1, 200)  # 20
    inside = u[:, :k] @ torch.randn(k, k, dtype=torch.float64) @ v[:, :k].T
    outside = u[:, k:] @ torch.randn(200 - k, 200 - k, dtype=torch.float64) @ v[:, k:].T
    for d, expect in ((1e-3 * inside, 1.0), (1e-3 * outside, 0.0)):
        r = _gram_route(w, d)
        for side in ("both", "left", "right"):
            assert r[f"principal_energy_{side}_rho_0.1"] == pytest.approx(expect, abs=1e-6), side


def test_gaussian_delta_matches_random_baseline():
    torch.manual_seed(2)
    w = torch.randn(400, 300, dtype=torch.float64)
    d = 1e-3 * torch.randn(400, 300, dtype=torch.float64)
    r = _gram_route(w, d)
    k = rho_k(0.1, 300)
    assert r["principal_energy_both_rho_0.1_random"] == pytest.approx(k * k / (400 * 300))
    assert r["principal_energy_left_rho_0.1_random"] == pytest.approx(k / 400)
    assert r["principal_energy_right_rho_0.1_random"] == pytest.approx(k / 300)
    for side in ("both", "left", "right"):
        # E[energy] equals the baseline; the sd of ‖P Δ Q‖² over k·k Gaussian entries is ~1/k relative
        assert r[f"principal_energy_{side}_rho_0.1"] == pytest.approx(r[f"principal_energy_{side}_rho_0.1_random"], rel=0.15)


def test_scaling_w_keeps_subspaces_and_drifts_spectrum():
    torch.manual_seed(3)
    w = torch.randn(150, 100, dtype=torch.float64)
    r = _gram_route(w, 0.5 * w)  # W' = 1.5 W: same singular vectors, s' = 1.5 s
    assert r["rotation_rho_0.1"] == pytest.approx(0.0, abs=1e-6)
    assert r["spectral_drift"] == pytest.approx(0.5, rel=1e-9)
    assert r["principal_energy_both_rho_0.2"] == pytest.approx(
        float((_svd(w)[1][:20] ** 2).sum() / (_svd(w)[1] ** 2).sum()), rel=1e-9)


def test_rotation_of_a_swapped_direction():
    # W = diag(3, 2, 1, …) → W' swaps the top left singular direction into e_{k+1}: sine 1 for that angle.
    n = 100
    s = torch.linspace(10, 1, n, dtype=torch.float64)
    w = torch.diag(s)
    w2 = w.clone()
    w2[[0, 50]] = w2[[50, 0]]  # rows swapped: left subspace of the top value moves to e_50
    r = _gram_route(w, w2 - w)
    assert r["rotation_rho_0.01"] == pytest.approx(1.0, abs=1e-9)  # k = 1: one angle, 90°
