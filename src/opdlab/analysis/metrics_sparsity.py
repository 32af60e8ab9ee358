"""Which coordinates changed, and how many sit below small thresholds (DESIGN 1).

Both tensors are first cast to the analysis dtype by the caller (bf16 by default);
the difference Δ = W' − W is then taken in fp32, where it is exact for bf16 inputs.
Functions return additive counts so that groups of tensors are sums (see aggregate.py).

Example::

    u = changed_mask(w_bf16, w_tuned_bf16, atol=0.0)     # bool, same shape as w
    counts = sparsity_counts(w.float(), delta, source_sq=float((w.float() ** 2).sum()))
"""

from __future__ import annotations

import math

import torch

# |Δ| < ε curve (absolute) and |Δ| < τ·rms(W) curve (relative to the tensor's scale).
EPSILONS: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
TAUS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
ATOL_LOOSE = 1e-5  # the study's second threshold, next to bitwise (atol 0)


def fmt(x: float) -> str:
    """A threshold as it appears in metric names: 1e-05, 1e-08, 1e-02 (one significant digit)."""
    return f"{x:.0e}"


def update(source: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """Δ = tuned − source in fp32 (shape of the inputs). Inputs are already in the analysis dtype."""
    return tuned.to(torch.float32) - source.to(torch.float32)


def changed_mask(source: torch.Tensor, tuned: torch.Tensor, atol: float) -> torch.Tensor:
    """U = |Δ| > atol, with Δ = tuned − source taken in fp32.

    Args:
        source, tuned: same-shape tensors, both already cast to the analysis dtype.
        atol: 0 means "any change at all" (bitwise for bf16/fp32 inputs, except ±0).
    Returns:
        bool tensor of the inputs' shape.
    """
    if source.shape != tuned.shape:
        raise ValueError(f"changed_mask: shapes differ: {tuple(source.shape)} vs {tuple(tuned.shape)}")
    return update(source, tuned).abs() > atol


def sparsity_count_keys() -> list[str]:
    """Names of the additive counts returned by `sparsity_counts`."""
    return (["changed", f"changed_atol_{fmt(ATOL_LOOSE)}"]
            + [f"n_below_eps_{fmt(e)}" for e in EPSILONS]
            + [f"n_below_rms_{fmt(t)}" for t in TAUS])


def sparsity_counts(delta: torch.Tensor, rms_source: float, nonzero_abs: torch.Tensor | None = None) -> dict[str, float]:
    """Counts of changed coordinates and of |Δ| below the ε and τ·rms(W) thresholds.

    Args:
        delta: Δ in fp32, any shape (a row block of a tensor is fine: counts add up).
        rms_source: rms(W) of the *whole* tensor, sqrt(ΣW²/n).
        nonzero_abs: |Δ| of the nonzero entries of `delta`, when the caller has it already
            (every threshold is positive, so zeros count below all of them: only the
            nonzero entries are compared — 10× fewer for a 10 %-dense update).
    Returns:
        {"changed", "changed_atol_1e-05", "n_below_eps_<ε>"…, "n_below_rms_<τ>"…} as floats.
    """
    a = delta.reshape(-1).abs()[delta.reshape(-1) != 0] if nonzero_abs is None else nonzero_abs
    zeros = float(delta.numel() - a.numel())

    def below(x: float) -> float:
        return zeros + float(torch.count_nonzero(a < x))

    out = {"changed": float(a.numel()), f"changed_atol_{fmt(ATOL_LOOSE)}": float(torch.count_nonzero(a > ATOL_LOOSE))}
    for e in EPSILONS:
        out[f"n_below_eps_{fmt(e)}"] = below(e)
    for t in TAUS:
        out[f"n_below_rms_{fmt(t)}"] = below(t * rms_source)
    return out


def sparsity_ratios(sums: dict[str, float]) -> dict[str, float]:
    """Ratios from summed counts (one tensor or a group): needs `numel` and the count keys
    (`source_zero`, the exact zeros of W, is optional: NaN without it)."""
    n = sums["numel"]
    out = {
        "sparsity": 1.0 - sums["changed"] / n,
        f"sparsity_atol_{fmt(ATOL_LOOSE)}": 1.0 - sums[f"changed_atol_{fmt(ATOL_LOOSE)}"] / n,
    }
    for e in EPSILONS:
        out[f"frac_below_eps_{fmt(e)}"] = sums[f"n_below_eps_{fmt(e)}"] / n
    for t in TAUS:
        out[f"frac_below_rms_{fmt(t)}"] = sums[f"n_below_rms_{fmt(t)}"] / n
    # Share of the *source* coordinates that are exactly 0 (in the analysis dtype), numel-weighted.
    out["base_exact_zero_fraction"] = sums["source_zero"] / n if "source_zero" in sums else math.nan
    return out
