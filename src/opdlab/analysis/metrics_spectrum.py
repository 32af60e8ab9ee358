"""Spectrum of an update Δ (2-D): numerical rank, top-k energy, stable and effective rank (DESIGN 4).

Singular values come from one of two methods, recorded per tensor:
  1. "gram" (exact): eigenvalues of the fp64 Gram matrix ΔᵀΔ of the smaller side, σ = √λ.
     Why not `torch.linalg.svdvals` in fp32: on a planted rank-4 4864×896 Δ its noise floor
     was ≈1e-7·σ₁ (the 1e-6 tolerance sits right above it), while the fp64 Gram's was ≈2e-8·σ₁,
     and it costs about half as much. The Gram is accumulated over row blocks, so a
     151936×896 embedding never needs a second full copy.
  2. "randomized": top-64 values from `torch.svd_lowrank` (4 power iterations), when the
     smaller side exceeds `exact_svd_max`. Metrics that need the whole spectrum are then NaN
     (effective rank; rank fraction once all 64 values pass the tolerance; top-p % energy
     when ⌈p·min(m,n)⌉ > 64). ‖Δ‖_F² is always exact, so top-k energy and stable rank are too.
"""

from __future__ import annotations

import math

import torch

from opdlab.analysis.metrics_sparsity import fmt

RANK_TOLS: tuple[float, ...] = (1e-6, 1e-5, 1e-4)
TOP_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
TOP_PERCENTS: tuple[float, ...] = (1.0, 5.0, 10.0)
RANDOMIZED_K = 64
RANDOMIZED_NITER = 4


def spectrum_keys() -> list[str]:
    return ([f"rank_fraction_tol_{fmt(t)}" for t in RANK_TOLS] + [f"top{k}_energy" for k in TOP_KS]
            + [f"top_{p:g}pct_sv_energy" for p in TOP_PERCENTS] + ["stable_rank", "effective_rank"])


def gram_singular_values(gram: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, fp64) of a matrix X from its Gram XᵀX (n×n, fp64)."""
    lam = torch.linalg.eigvalsh(gram.to(torch.float64))
    return lam.flip(0).clamp_min(0).sqrt()


def randomized_singular_values(delta: torch.Tensor, k: int = RANDOMIZED_K, niter: int = RANDOMIZED_NITER) -> torch.Tensor:
    """Top-k singular values (descending, fp64) of Δ (m×n) by randomized subspace iteration."""
    k = min(k, *delta.shape)
    q = min(k + 10, *delta.shape)  # oversampling improves the last of the k values
    _, s, _ = torch.svd_lowrank(delta.to(torch.float32), q=q, niter=niter)
    return s[:k].to(torch.float64).cpu()


def spectrum_metrics(sv: torch.Tensor, total_energy: float, min_dim: int, complete: bool) -> dict[str, float]:
    """Rank and energy statistics of one Δ from its singular values.

    Args:
        sv: singular values, descending (all min(m,n) of them when `complete`, else the top ones).
        total_energy: ‖Δ‖_F² = Σσ², computed from Δ directly (exact even when `sv` is partial).
        min_dim: min(m, n).
        complete: whether `sv` holds the whole spectrum.
    Returns:
        rank_fraction_tol_<tol>, top<k>_energy, top_<p>pct_sv_energy, stable_rank, effective_rank
        (NaN where undefined: Δ = 0, or not computable from a partial spectrum).
    """
    keys = spectrum_keys()
    sv = sv.to(torch.float64)
    if sv.numel() == 0 or float(sv[0]) <= 0 or total_energy <= 0:
        return {k: math.nan for k in keys}
    s1 = float(sv[0])
    out: dict[str, float] = {}
    for tol in RANK_TOLS:
        r = int((sv > tol * s1).sum())
        out[f"rank_fraction_tol_{fmt(tol)}"] = r / min_dim if (complete or r < sv.numel()) else math.nan
    cum = sv.pow(2).cumsum(0)
    for k in TOP_KS:
        kk = min(k, min_dim)
        out[f"top{k}_energy"] = min(1.0, float(cum[kk - 1]) / total_energy) if kk <= sv.numel() else math.nan
    for p in TOP_PERCENTS:
        kk = max(1, math.ceil(p / 100.0 * min_dim))
        out[f"top_{p:g}pct_sv_energy"] = min(1.0, float(cum[kk - 1]) / total_energy) if kk <= sv.numel() else math.nan
    out["stable_rank"] = total_energy / s1**2
    if complete:
        p_i = sv / sv.sum()
        p_i = p_i[p_i > 0]
        out["effective_rank"] = math.exp(float(-(p_i * p_i.log()).sum()))
    else:
        out["effective_rank"] = math.nan
    return out
