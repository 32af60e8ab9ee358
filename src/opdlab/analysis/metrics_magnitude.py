"""Do updates land on large or on small source weights? Magnitude-mask enrichment (DESIGN 6).

For ρ in RHOS and a tensor with n entries:
  principal mask P_ρ = the ⌈ρn⌉ largest entries of |W_r|, W_r the rank-r reconstruction of W,
                       r = ⌊ρ·min(m,n)⌋ (2-D tensors only);
  low-magnitude mask L_ρ = the ⌈ρn⌉ smallest entries of |W| (every tensor).
  enrichment(X) = (|X∩U|/|U|) / (|X|/n), U the changed mask (atol 0): 1 = chance,
  above 1 = updates land there more often than chance.

The top/bottom ⌈ρn⌉ sets are found with the exact two-pass selection of selection.py over
row blocks; ties split evenly (bf16 |W| has many ties). W_r = W V_r V_rᵀ in the tall frame
(U S = W V), built incrementally over increasing r so all ρ cost one rank-r_max product.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from opdlab.analysis.metrics_subspace import RHOS, rho_k


def mask_size(numel: int, rho: float) -> int:
    """|X| = ⌈ρn⌉ (at least 1)."""
    return max(1, math.ceil(rho * numel - 1e-9))


def _rho(r: float) -> str:
    return f"rho_{r:g}"


def principal_ranks(min_dim: int) -> list[tuple[float, int]]:
    """(ρ, r) pairs with r = ⌊ρ·min(m,n)⌋ ≥ 1, in increasing r."""
    return [(rho, rho_k(rho, min_dim)) for rho in RHOS if rho_k(rho, min_dim) >= 1]


def reconstructions(w_block: torch.Tensor, v: torch.Tensor, ranks: list[int]) -> Iterator[torch.Tensor]:
    """|W_r| for a row block of the tall-frame W, for each r in `ranks` (increasing).

    Args:
        w_block: rows of W (b×n, fp32).
        v: right singular vectors of W (n×≥max(ranks)), columns by descending singular value.
    Yields:
        |W_r| row blocks (b×n, fp32), one per rank, computed as running sums of
        (W V_[a:b]) V_[a:b]ᵀ so the total cost is one product of rank max(ranks). The
        yielded tensor is one buffer, overwritten by the next rank: use it before asking
        for the next (a fresh 17 MB tensor per rank costs page faults, and memory).
    """
    if not ranks:
        return
    vf = v[:, : max(ranks)].to(w_block.dtype)
    proj = w_block @ vf  # b×r_max = U_r S_r restricted to these rows
    rec = torch.zeros_like(w_block)
    out = torch.empty_like(w_block)
    prev = 0
    for r in ranks:
        rec.addmm_(proj[:, prev:r], vf[:, prev:r].T)
        prev = r
        yield torch.abs(rec, out=out)


def magnitude_ratios(sums: dict[str, float]) -> dict[str, float]:
    """Low-magnitude and principal-mask enrichment by ρ from (summed) hit counts."""
    out: dict[str, float] = {}

    def enrich(hits: float, size: float, changed: float, numel: float) -> float:
        if changed <= 0 or numel <= 0 or size <= 0:
            return math.nan
        return (hits / changed) / (size / numel)

    for rho in RHOS:
        key = _rho(rho)
        out[f"low_magnitude_enrichment_{key}"] = enrich(
            sums.get(f"low_mag_hits_{key}", 0.0), sums.get(f"low_mag_size_{key}", 0.0),
            sums.get("changed", 0.0), sums.get("numel", 0.0))
        out[f"principal_mask_enrichment_{key}"] = enrich(
            sums.get(f"principal_hits_{key}", 0.0), sums.get(f"principal_size_{key}", 0.0),
            sums.get(f"principal_changed_{key}", 0.0), sums.get(f"principal_numel_{key}", 0.0))
    return out
