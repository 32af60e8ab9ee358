"""Principal subspaces of W: where Δ lands, how far they rotate, how the spectrum drifts (DESIGN 5).

W = U S Vᵀ; for ρ in RHOS, k = ⌊ρ·min(m,n)⌋ and
  E_both  = ‖U_kᵀ Δ V_k‖²/‖Δ‖²   (random baseline k²/(mn))
  E_left  = ‖U_kᵀ Δ‖²/‖Δ‖²       (k/m)
  E_right = ‖Δ V_k‖²/‖Δ‖²        (k/n)
  rotation = mean sine of the principal angles between the top-k left singular subspaces of W and W'
  spectral drift = ‖s(W') − s(W)‖/‖s(W)‖.

Two routes give the same additive sums:
  * `subspace_sums_gram` — exact, from three Gram matrices of the "tall frame"
    (the tensor transposed if needed so that m ≥ n): G = WᵀW, C = WᵀΔ, D = ΔᵀΔ.
    W is factored once (eigh of G gives V and S; U_k = W V_k S_k⁻¹ is never formed:
    U_kᵀΔ = S_k⁻¹V_kᵀC). W' is factored *in W's eigenbasis*: G' = V(Λ + F)Vᵀ with
    F = Vᵀ(C + Cᵀ + D)V, so eigh(Λ + F) = Z Λ' Zᵀ gives S' and V' = V Z for every ρ at once.
    Grams are summed over row blocks, so memory is O(n²) beyond one block.
  * `subspace_sums_direct` — from explicit (possibly randomized, truncated) factorizations;
    used for matrices above `exact_svd_max` and as the independent reference in tests.

Precision (the caller chooses by the dtype of G): G and its eigh may be fp32 — V only has
to be as accurate as the fp32 weights — while Λ + F and its eigh are always fp64, so that
W and W' share one base and only the update moves it. Factoring W' from scratch in fp32
would put independent rounding into V and V'; that noise swamps the rotation of a small
update (measured on a 4864×896 bf16 matrix with ‖Δ‖/‖W‖ = 6e-4: rotation 14 % off), while
the shared-base route stays within 1e-5 relative of an fp64 SVD reference for the energies,
2e-3 for the rotation and 1e-3 for the drift (whose near-null singular values of a square W
carry fp32 eigenvalue error), down to ‖Δ‖/‖W‖ ≈ 4e-6 (tests/unit/test_analysis_precision.py).

Sums are projected energies (and their random-baseline energies), sums of sines and
angle counts, and Σ(s'−s)², Σs², so groups are ratios of sums.
"""

from __future__ import annotations

import math

import torch

RHOS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2)


def rho_k(rho: float, min_dim: int) -> int:
    """k = ⌊ρ·min(m,n)⌋ (0 means the ρ does not apply to this tensor)."""
    return int(math.floor(rho * min_dim + 1e-9))


def _rho(r: float) -> str:
    return f"rho_{r:g}"


def _factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, eigenvectors with matching columns) of a symmetric matrix, in its dtype."""
    lam, vec = torch.linalg.eigh(gram)
    return lam.flip(0), vec.flip(1)


def _inv(s: torch.Tensor) -> torch.Tensor:
    """1/s, with 0 for singular values at rounding level (their directions carry no energy of W)."""
    floor = float(s[0]) * 1e-12 if s.numel() else 0.0
    return torch.where(s > floor, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))


def _sines(cos: torch.Tensor) -> torch.Tensor:
    return (1.0 - cos.clamp(0.0, 1.0).pow(2)).clamp_min(0.0).sqrt()




def _baselines(out: dict[str, float], key: str, k: int, m: int, n: int, delta_sq: float) -> None:
    out[f"proj_energy_{key}"] = delta_sq
    out[f"proj_both_random_{key}"] = k * k / (m * n) * delta_sq
    out[f"proj_left_random_{key}"] = k / m * delta_sq
    out[f"proj_right_random_{key}"] = k / n * delta_sq
    out[f"rotation_count_{key}"] = float(k)


def subspace_sums_gram(
    gram_w: torch.Tensor, cross: torch.Tensor, gram_d: torch.Tensor, m: int, n: int, transposed: bool
) -> tuple[dict[str, float], torch.Tensor]:
    """Additive subspace sums from tall-frame Grams (n_t×n_t with n_t = min(m, n)).

    Args:
        gram_w: G = WᵀW (fp32 or fp64: W's factorization runs in this dtype);
        cross: C = WᵀΔ;  gram_d: D = ΔᵀΔ (tall frame; any float dtype).
        m, n: the tensor's original shape (rows, columns).
        transposed: whether the tall frame is the transpose of the original (m < n).
    Returns:
        (sums, V): V holds W's right singular vectors of the tall frame, by descending value
        (in gram_w's dtype).
    """
    lam, v = _factor(gram_w)
    small = v.dtype  # dtype of the n_t³ products below: the precision V has anyway
    c, d = cross.to(small), gram_d.to(small)
    lam = lam.to(torch.float64).clamp_min(0)
    # W' in W's eigenbasis: H = Λ + Vᵀ(C + Cᵀ + D)V, in fp64 (see module docs).
    f = v.T @ ((c + c.T + d) @ v)
    h = torch.diag(lam) + f.to(torch.float64)
    lam2, z = _factor((h + h.T) / 2)
    lam2 = lam2.clamp_min(0)
    s, s2 = lam.sqrt(), lam2.sqrt()
    delta_sq = float(torch.trace(gram_d.to(torch.float64)))
    inv_s, inv_s2 = _inv(s), _inv(s2)
    ks = [rho_k(rho, min(m, n)) for rho in RHOS]
    k_max = max([k for k in ks if k >= 1], default=0)
    out: dict[str, float] = {}
    if k_max >= 1 and delta_sq > 0:
        vc = (v[:, :k_max].T @ c).to(torch.float64)  # rows v_iᵀWᵀΔ = s_i u_iᵀΔ
        vcv = vc @ v.to(torch.float64)  # V_kᵀ C V (k_max×n_t)
        dv_diag = (v[:, :k_max] * (d @ v[:, :k_max])).sum(0).to(torch.float64)  # ‖Δ v_i‖²
        z64 = z.to(torch.float64)
    for rho, k in zip(RHOS, ks):
        if k < 1 or delta_sq <= 0:
            continue
        key = _rho(rho)
        right_t = float(dv_diag[:k].sum())  # ‖Δ V_k‖² in the tall frame
        ut_delta = inv_s[:k, None] * vc[:k]  # U_kᵀΔ (k×n_t)
        left_t = float(ut_delta.pow(2).sum())
        both = float((inv_s[:k, None] * vcv[:k, :k]).pow(2).sum())  # ‖U_kᵀ Δ V_k‖²
        left, right = (right_t, left_t) if transposed else (left_t, right_t)
        out[f"proj_both_{key}"], out[f"proj_left_{key}"], out[f"proj_right_{key}"] = both, left, right
        _baselines(out, key, k, m, n, delta_sq)
        if transposed:  # the original's left subspace is the tall frame's right one: V_kᵀV'_k = Z[:k, :k]
            cos = torch.linalg.svdvals(z64[:k, :k])
        else:  # U_kᵀU'_k = S_k⁻¹ V_kᵀ WᵀW' V'_k S'_k⁻¹, with V_kᵀWᵀW'V = Λ_k[I 0] + V_kᵀCV and V' = V Z
            a = vcv[:k].clone()
            a[:, :k] += torch.diag(lam[:k])
            cos = torch.linalg.svdvals(inv_s[:k, None] * (a @ z64[:, :k]) * inv_s2[None, :k])
        out[f"rotation_sine_sum_{key}"] = float(_sines(cos).sum())
    out["drift_sq"] = float((s2 - s).pow(2).sum())
    out["spectrum_sq"] = float(s.pow(2).sum())
    return out, v


def subspace_sums_direct(
    delta: torch.Tensor,
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
    u2: torch.Tensor, s2: torch.Tensor,
) -> dict[str, float]:
    """The same sums from explicit factorizations in the original orientation.

    Args:
        delta: Δ (m×n).
        u, s, v: top-r singular triplets of W (m×r, r, n×r), r ≥ ⌊max(RHOS)·min(m,n)⌋ for full coverage.
        u2, s2: top-r left singular vectors and values of W'.
    Spectral drift uses the singular values available (all of them for an exact SVD).
    """
    m, n = delta.shape
    d = delta.to(torch.float64)
    u, v, u2 = u.to(torch.float64), v.to(torch.float64), u2.to(torch.float64)
    delta_sq = float(d.pow(2).sum())
    out: dict[str, float] = {}
    for rho in RHOS:
        k = rho_k(rho, min(m, n))
        if k < 1 or delta_sq <= 0 or k > u.shape[1]:
            continue
        key = _rho(rho)
        ut_d = u[:, :k].T @ d
        out[f"proj_both_{key}"] = float((ut_d @ v[:, :k]).pow(2).sum())
        out[f"proj_left_{key}"] = float(ut_d.pow(2).sum())
        out[f"proj_right_{key}"] = float((d @ v[:, :k]).pow(2).sum())
        _baselines(out, key, k, m, n, delta_sq)
        out[f"rotation_sine_sum_{key}"] = float(_sines(torch.linalg.svdvals(u[:, :k].T @ u2[:, :k])).sum())
    r = min(s.numel(), s2.numel())
    out["drift_sq"] = float((s2[:r].double() - s[:r].double()).pow(2).sum())
    out["spectrum_sq"] = float(s[:r].double().pow(2).sum())
    return out


def subspace_ratios(sums: dict[str, float]) -> dict[str, float]:
    """Projection energies with baselines, rotation and drift from (summed) subspace sums."""
    out: dict[str, float] = {}
    for rho in RHOS:
        key = _rho(rho)
        energy = sums.get(f"proj_energy_{key}", 0.0)
        for side in ("both", "left", "right"):
            ok = energy > 0
            out[f"principal_energy_{side}_{key}"] = sums[f"proj_{side}_{key}"] / energy if ok else math.nan
            out[f"principal_energy_{side}_{key}_random"] = sums[f"proj_{side}_random_{key}"] / energy if ok else math.nan
        count = sums.get(f"rotation_count_{key}", 0.0)
        out[f"rotation_{key}"] = sums[f"rotation_sine_sum_{key}"] / count if count > 0 else math.nan
    spec = sums.get("spectrum_sq", 0.0)
    out["spectral_drift"] = math.sqrt(sums["drift_sq"] / spec) if spec > 0 else math.nan
    return out
