"""Size of an update: relative norm and how concentrated its energy is on few coordinates (DESIGN 3).

Additive sums per tensor (ΣW², ΣΔ², the Δ² mass of the top-p coordinates) add up over
groups; ratios are derived from the sums. Energy share (ΣΔ²_group / ΣΔ²) is computed in
aggregate.py, where the total is known.

Coordinate energy of a group is the Δ² mass in the top p % coordinates *of each tensor*
divided by the group's ΣΔ² — the same fraction p of the group's coordinates, chosen
tensor by tensor, so groups never need a global sort.
"""

from __future__ import annotations

import math

import torch

COORD_PERCENTS: tuple[float, ...] = (0.1, 1.0, 5.0)  # top-p % coordinates by |Δ|


def coord_key(p_percent: float) -> str:
    return f"coord_energy_top_{p_percent:g}pct"


def coord_k(numel: int, p_percent: float) -> int:
    """Number of coordinates in the top p %: ⌈p/100 · n⌉ (at least 1)."""
    return max(1, math.ceil(p_percent / 100.0 * numel))


def size_sums(source: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """{"source_sq": ΣW², "delta_sq": ΣΔ²} in fp64, for a tensor or a row block (fp32 inputs)."""
    return {
        "source_sq": float(source.double().pow(2).sum()),
        "delta_sq": float(delta.double().pow(2).sum()),
    }


def size_ratios(sums: dict[str, float]) -> dict[str, float]:
    """relative_update_norm = ‖Δ‖_F/‖W‖_F and the coordinate-energy shares from summed values."""
    out = {"relative_update_norm": math.sqrt(sums["delta_sq"] / sums["source_sq"]) if sums["source_sq"] > 0 else math.nan}
    for p in COORD_PERCENTS:
        mass = sums.get(f"{coord_key(p)}_mass", math.nan)
        out[coord_key(p)] = mass / sums["delta_sq"] if sums["delta_sq"] > 0 else math.nan
    return out
