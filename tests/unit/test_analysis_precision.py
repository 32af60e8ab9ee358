"""The fast per-tensor route against a straightforward fp64 reference, metric by metric.

`analyze_tensor` builds G = WᵀW and C = WᵀΔ in fp32 and factors W in fp32 for frames at
least FP32_GRAM_MIN wide; D = ΔᵀΔ, W' (in W's eigenbasis) and every selection stay exact.
The reference here takes full fp64 SVDs of W, W' and Δ and sorts. Tolerances, and why:
  * counts, sparsity, coordinate energy, low-magnitude hits: exact either way (1e-12);
  * relative update norm: ΣW² is an fp32 cascade sum (~3e-8 relative): 1e-7;
  * spectrum of Δ (fp64 Gram vs fp64 SVD): 1e-9 relative on every spectrum metric;
  * subspace energies: fp32 rounding of V, ~1e-7/gap: 1e-5 relative;
  * spectral drift: W's smallest singular values come from fp32 eigenvalues (absolute error
    ~1e-7·λ₁), so s' − s of the few near-null directions of a square W is off by a few %:
    1e-3 relative (measured 2.6e-4 here on a 400×400 Gaussian W, 3.5e-5 on an 896×896 q_proj
    of the benchmark pair; rectangular matrices 2e-7);
  * rotation: mean sine of angles between near-degenerate directions, the most sensitive
    metric: 2e-3 relative (measured ≤ 4e-4 on the Qwen2.5-0.5B-shaped benchmark pair, 1.3e-3
    here at ‖Δ‖/‖W‖ ≈ 4e-6, where the rotation itself is ~4e-6);
  * principal-mask enrichment: fp32 |W_r| may order a few near-tied entries differently
    from fp64: 2e-3 relative (a few flips out of ⌈ρn⌉).
The updates range over ‖Δ‖/‖W‖ ≈ 4e-3 … 4e-6: the shared-base factorization of W' keeps the
rotation of small updates exact, where factoring W' on its own in fp32 would not.
"""

from __future__ import annotations

import math

import pytest
import torch

from opdlab.analysis import per_tensor
from opdlab.analysis.aggregate import derive
from opdlab.analysis.metrics_magnitude import mask_size
from opdlab.analysis.metrics_spectrum import spectrum_metrics
from opdlab.analysis.metrics_subspace import RHOS, rho_k, subspace_ratios, subspace_sums_direct
from opdlab.analysis.per_tensor import TensorSpec, analyze_tensor

EXACT, SIZE, SPECTRUM, ENERGY, DRIFT, ROTATION, PRINCIPAL_MASK = 1e-12, 1e-7, 1e-9, 1e-5, 1e-3, 2e-3, 2e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(shape: tuple[int, int], scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 W and 20 % of its coordinates moved by ~scale·|W| (fp32 W').

    Rectangular W has a decaying spectrum; a square W is Gaussian (its smallest singular
    values go towards 0, the hard case for the drift)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if m == n:
        w = torch.randn(shape, generator=g).bfloat16().float()
    else:
        u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
        w = ((u * torch.logspace(0, -1, min(m, n))) @ v.T).bfloat16().float()
    mask = torch.rand(shape, generator=g) < 0.2
    w2 = torch.where(mask, w + scale * w.abs().mean() * torch.randn(shape, generator=g), w)
    return w, w2


def _tie_split_sum(values: torch.Tensor, weight: torch.Tensor, k: int, largest: bool) -> float:
    sv, _ = torch.sort(values, descending=largest)
    t = sv[k - 1]
    strict = (values > t) if largest else (values < t)
    tie = values == t
    wd = weight.double()
    return float(wd[strict].sum()) + (k - int(strict.sum())) / int(tie.sum()) * float(wd[tie].sum())


def _reference(w: torch.Tensor, w2: torch.Tensor) -> dict[str, float]:
    """Every per-tensor ratio the straightforward way, in fp64."""
    wd, w2d = w.double(), w2.double()
    d = w2d - wd
    m, n = w.shape
    u, s, vh = torch.linalg.svd(wd, full_matrices=False)
    u2, s2, _ = torch.linalg.svd(w2d, full_matrices=False)
    sums = subspace_sums_direct(d, u, s, vh.T, u2, s2)
    out = subspace_ratios(sums)
    sv = torch.linalg.svdvals(d)
    out.update(spectrum_metrics(sv, float(d.pow(2).sum()), min(m, n), complete=True))
    changed = (d != 0).reshape(-1)
    n_changed = float(changed.sum())
    for rho in RHOS:
        size = mask_size(w.numel(), rho)
        low = _tie_split_sum(wd.abs().reshape(-1), changed, size, largest=False)
        out[f"low_magnitude_enrichment_rho_{rho:g}"] = (low / n_changed) / (size / w.numel())
        r = rho_k(rho, min(m, n))
        rec = ((u[:, :r] * s[:r]) @ vh[:r]).abs().reshape(-1)
        hits = _tie_split_sum(rec, changed, size, largest=True)
        out[f"principal_mask_enrichment_rho_{rho:g}"] = (hits / n_changed) / (size / w.numel())
    out["sparsity"] = 1.0 - n_changed / w.numel()
    out["relative_update_norm"] = math.sqrt(float(d.pow(2).sum() / wd.pow(2).sum()))
    sq = d.pow(2).reshape(-1)
    for p in (0.1, 1.0, 5.0):
        k = max(1, math.ceil(p / 100 * w.numel()))
        out[f"coord_energy_top_{p:g}pct"] = float(sq.sort(descending=True).values[:k].sum() / sq.sum())
    return out


def _tolerance(key: str) -> float:
    if key.startswith("rotation"):
        return ROTATION
    if key.startswith("principal_mask"):
        return PRINCIPAL_MASK
    if key == "spectral_drift":
        return DRIFT
    if key.startswith("principal_energy"):
        return ENERGY
    if key == "relative_update_norm":
        return SIZE
    if key.startswith(("rank_fraction", "top", "stable_rank", "effective_rank")):
        return SPECTRUM
    return EXACT


def _fast(w: torch.Tensor, w2: torch.Tensor, **kw) -> dict[str, float]:
    spec = TensorSpec("model.layers.0.mlp.up_proj.weight", tuple(w.shape), lambda a, b: (w[a:b], w2[a:b]))
    res = analyze_tensor(spec, **kw)
    return {**derive(res.sums), **{k: v for k, v in res.values.items() if isinstance(v, float)}}


@pytest.mark.parametrize("scale", [1e-2, 1e-3, 1e-4, 1e-5])
@pytest.mark.parametrize("shape", [(600, 300), (300, 600), (400, 400)])
def test_fast_route_matches_fp64_reference(shape, scale):
    assert min(shape) >= per_tensor.FP32_GRAM_MIN  # the fp32 route is the one under test
    w, w2 = _pair(shape, scale)
    ref, got = _reference(w, w2), _fast(w, w2)
    for key, want in ref.items():
        assert got[key] == pytest.approx(want, rel=_tolerance(key), abs=1e-12), key


def test_streamed_route_matches_in_memory_route():
    """Row blocks add fp32 Grams in fp64; one block keeps them fp32: same tolerances as above."""
    w, w2 = _pair((700, 300), 1e-3, seed=1)
    whole, blocked = _fast(w, w2), _fast(w, w2, block_elems=300 * 97)  # 97-row blocks
    for key, want in whole.items():
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(blocked[key]), key
            continue
        assert blocked[key] == pytest.approx(want, rel=_tolerance(key), abs=1e-12), key
