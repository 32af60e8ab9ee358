"""The bf16 precision control: how much "sparsity" is storage rounding (DESIGN 2).

A bf16 number keeps 8 significant bits, so an fp32 change smaller than half a bf16 unit in
the last place (ULP) of |w| — about |w|·2⁻⁹ — is rounded away when the tuned weights are
saved in bf16. With fp32 checkpoints of both sides we count, per tensor:
  changed_fp32 / changed_fp32_atol_1e-05 — the sparsity the fp32 weights show;
  below_half_ulp — coordinates whose fp32 change |Δ₃₂| is below half a bf16 ULP of |W₃₂|
                   (unchanged coordinates included: 0 is below);
  rounded_away   — coordinates that changed in fp32 but are bit-identical after casting both
                   sides to bf16 (the direct measurement the half-ULP rule predicts).
"""

from __future__ import annotations

import math

import torch

from opdlab.analysis.metrics_sparsity import ATOL_LOOSE, fmt

_BF16_MANTISSA_BITS = 7
_MIN_FREXP_EXP = -125  # bf16 shares fp32's exponent range: smallest normal 2^-126 = 0.5·2^-125


def half_ulp_bf16(w: torch.Tensor) -> torch.Tensor:
    """Half a bf16 ULP at |w| (fp32, shape of w).

    |w| = f·2^E with f in [0.5, 1) lies in [2^(E-1), 2^E), where a bf16 ULP is 2^(E-1-7);
    half of it is 2^(E-9). Zeros and subnormals use the subnormal spacing 2^-133.
    """
    _, exp = torch.frexp(w.to(torch.float32).abs())
    exp = torch.where(w == 0, torch.full_like(exp, _MIN_FREXP_EXP), exp.clamp_min(_MIN_FREXP_EXP))
    return torch.ldexp(torch.ones_like(w, dtype=torch.float32), (exp - _BF16_MANTISSA_BITS - 2).to(torch.float32))


def precision_counts(source32: torch.Tensor, tuned32: torch.Tensor) -> dict[str, float]:
    """Additive precision-control counts for a tensor or row block of fp32 weights."""
    w = source32.to(torch.float32)
    delta = tuned32.to(torch.float32) - w
    a = delta.abs()
    same_in_bf16 = w.to(torch.bfloat16) == tuned32.to(torch.bfloat16)
    return {
        "precision_numel": float(w.numel()),
        "changed_fp32": float((a > 0).sum()),
        f"changed_fp32_atol_{fmt(ATOL_LOOSE)}": float((a > ATOL_LOOSE).sum()),
        "below_half_ulp": float((a < half_ulp_bf16(w)).sum()),
        "rounded_away": float(((a > 0) & same_in_bf16).sum()),
    }


def precision_ratios(sums: dict[str, float]) -> dict[str, float]:
    """sparsity_fp32, sparsity_fp32_atol_1e-05, below_half_ulp_fraction, rounded_away_fraction (NaN without fp32)."""
    n = sums.get("precision_numel", 0.0)
    keys = ("sparsity_fp32", f"sparsity_fp32_atol_{fmt(ATOL_LOOSE)}", "below_half_ulp_fraction", "rounded_away_fraction")
    if n <= 0:
        return {k: math.nan for k in keys}
    return {
        keys[0]: 1.0 - sums["changed_fp32"] / n,
        keys[1]: 1.0 - sums[f"changed_fp32_atol_{fmt(ATOL_LOOSE)}"] / n,
        keys[2]: sums["below_half_ulp"] / n,
        keys[3]: sums["rounded_away"] / n,
    }
