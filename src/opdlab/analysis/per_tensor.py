"""Every metric of one tensor pair, streamed over row blocks (the work unit of `opdlab analyze`).

`analyze_tensor` reads W and W' in row blocks (whole, for all but the largest tensors) and
makes three passes over them; a tensor that fits in one block is read once and kept:
  A. ΣW², ΣΔ², the count of exact zeros in W, the fp64 Grams G = WᵀW, C = WᵀΔ, D = ΔᵀΔ of the
     tall frame (2-D tensors), and pass 1 of the exact selections (low-magnitude mask, coordinate energy);
  —  then one eigendecomposition each of G and G' = G + C + Cᵀ + D serves every ρ, and
     eigvalsh(D) gives the exact spectrum of Δ;
  B. sparsity counts (they need rms(W) of the whole tensor), pass 2 of those selections,
     and pass 1 of the principal-mask selections (|W_r| for every ρ in one product);
  C. pass 2 of the principal-mask selections;
plus one pass over the fp32 checkpoints for the precision control when they exist.
Matrices whose smaller side exceeds `exact_svd_max` are read whole and use randomized
factorizations instead (see metrics_spectrum / metrics_subspace). Tensors with more than two
dimensions (convolution kernels) are viewed as (shape[0], rest). 1-D tensors get the
element-wise metrics only.

Peak memory: one block of W and Δ in fp32 plus three n×n fp64 Grams and selection histograms.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from opdlab.analysis.blocks import row_ranges
from opdlab.analysis.metrics_magnitude import mask_size, principal_ranks, reconstructions
from opdlab.analysis.metrics_size import COORD_PERCENTS, coord_k, coord_key, size_sums
from opdlab.analysis.metrics_sparsity import sparsity_counts
from opdlab.analysis.metrics_spectrum import gram_singular_values, randomized_singular_values, spectrum_metrics
from opdlab.analysis.metrics_subspace import RHOS, subspace_sums_direct, subspace_sums_gram
from opdlab.analysis.precision import precision_counts
from opdlab.analysis.selection import TopKSum

BLOCK_ELEMS = 1 << 23  # 8.4 M entries: 32 MB per fp32 block; larger tensors are streamed
GRAM_CHUNK_ELEMS = 1 << 20  # rows converted to fp64 at a time for the Grams (8 MB each)

RowReader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # rows [a, b) -> (W, W')


@dataclass
class TensorSpec:
    """One matched tensor pair, with readers for row ranges of both sides."""

    name: str
    shape: tuple[int, ...]  # as analysed (vocabulary rows already cut to the shared ones)
    read: RowReader  # in the analysis dtype
    read_fp32: RowReader | None = None  # fp32 checkpoints for the precision control, if any


@dataclass
class TensorResult:
    name: str
    shape: tuple[int, ...]
    sums: dict[str, float]  # additive quantities (counts, sums of squares): groups add these
    values: dict[str, float | str] = field(default_factory=dict)  # per-tensor only: spectrum of Δ, method
    spectrum: torch.Tensor | None = None  # singular values of Δ (descending), 2-D tensors
    seconds: float = 0.0


def _rho(r: float) -> str:
    return f"rho_{r:g}"


def analyze_tensor(spec: TensorSpec, exact_svd_max: int = 1024, device: str = "cpu",
                   block_elems: int = BLOCK_ELEMS) -> TensorResult:
    """All metrics of one tensor pair (see module docs)."""
    start = time.perf_counter()
    shape = spec.shape
    rows = shape[0] if len(shape) >= 1 else 1
    cols = math.prod(shape[1:]) if len(shape) >= 2 else 1
    numel = math.prod(shape) if shape else 1
    is_matrix = len(shape) >= 2 and min(rows, cols) >= 2
    randomized = is_matrix and min(rows, cols) > exact_svd_max
    transposed = is_matrix and rows < cols
    # Row blocks only stream the tall frame; wide and randomized matrices are read whole.
    whole = (not is_matrix) or transposed or randomized
    ranges = [(0, rows)] if whole else row_ranges(rows, cols, block_elems)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(W, Δ) row blocks in fp32, as matrices (b×cols) or flat vectors."""
        if cache:
            yield from cache
            return
        for a, b in ranges:
            w, w2 = spec.read(a, b)
            w = w.to(device=device, dtype=torch.float32)
            d = w2.to(device=device, dtype=torch.float32) - w
            del w2
            if is_matrix:
                w, d = w.reshape(b - a, cols), d.reshape(b - a, cols)
            else:
                w, d = w.reshape(-1), d.reshape(-1)
            if len(ranges) == 1:
                cache.append((w, d))
            yield w, d

    # source_zero: exactly-zero coordinates of W in the analysis dtype (dequantized GGUF bases have ~none).
    sums: dict[str, float] = {"numel": float(numel), "source_sq": 0.0, "delta_sq": 0.0, "source_zero": 0.0}
    low_ks = [mask_size(numel, r) for r in RHOS]
    coord_ks = [coord_k(numel, p) for p in COORD_PERCENTS]
    low_sel = TopKSum(low_ks, largest=False)
    # Zeros of Δ carry no energy and sort last, so only the nonzero |Δ| are streamed.
    coord_sel = TopKSum(coord_ks, largest=True, clamp_k=True)
    n_t = min(rows, cols)
    gram_w = cross = gram_d = None
    if is_matrix and not randomized:
        gram_w, cross, gram_d = (torch.zeros(n_t, n_t, dtype=torch.float64, device=device) for _ in range(3))

    # ---- pass A
    for w, d in blocks():
        if gram_w is None:  # 2-D tensors take ΣW², ΣΔ² from the Grams' traces
            for k, v in size_sums(w, d).items():
                sums[k] += v
        sums["source_zero"] += float((w == 0).sum())
        low_sel.add_pass1(w.abs(), d != 0)
        nz = d[d != 0]
        coord_sel.add_pass1(nz.abs(), nz * nz)
        if gram_w is not None:
            _accumulate_grams(w.T if transposed else w, d.T if transposed else d, gram_w, cross, gram_d)

    values: dict[str, float | str] = {"svd_method": ""}
    spectrum = None
    v_tall = None  # right singular vectors of the tall frame, for the principal masks
    if is_matrix:
        if gram_w is not None:
            sums["source_sq"], sums["delta_sq"] = float(gram_w.trace()), float(gram_d.trace())
            sub, v_tall = subspace_sums_gram(gram_w, cross, gram_d, rows, cols, transposed)
            del cross
            spectrum = gram_singular_values(gram_d).cpu()
            values["svd_method"] = "gram"
        else:
            sub, v_tall, spectrum = _randomized(cache[0] if cache else next(blocks()), transposed)
            values["svd_method"] = "randomized"
        sums.update(sub)
        values.update(spectrum_metrics(spectrum, sums["delta_sq"], n_t, complete=gram_w is not None))

    # ---- pass B
    rms = math.sqrt(sums["source_sq"] / numel) if numel else 0.0
    ranks = principal_ranks(n_t) if is_matrix else []
    principal_sel = [TopKSum([mask_size(numel, rho)], largest=True) for rho, _ in ranks]
    for w, d in blocks():
        for k, v in sparsity_counts(d, rms).items():
            sums[k] = sums.get(k, 0.0) + v
        u = d != 0
        low_sel.add_pass2(w.abs(), u)
        nz = d[u]
        coord_sel.add_pass2(nz.abs(), nz * nz)
        for sel, (rec, ut) in zip(principal_sel, _recs(w, u, v_tall, ranks, transposed)):
            sel.add_pass1(rec, ut)

    # ---- pass C
    if principal_sel:
        for w, d in blocks():
            for sel, (rec, ut) in zip(principal_sel, _recs(w, d != 0, v_tall, ranks, transposed)):
                sel.add_pass2(rec, ut)

    for rho, k, hits in zip(RHOS, low_ks, low_sel.result()):
        sums[f"low_mag_hits_{_rho(rho)}"], sums[f"low_mag_size_{_rho(rho)}"] = hits, float(k)
    for p, mass in zip(COORD_PERCENTS, coord_sel.result()):
        sums[f"{coord_key(p)}_mass"] = mass
    for (rho, _), sel in zip(ranks, principal_sel):
        key = _rho(rho)
        sums[f"principal_hits_{key}"] = sel.result()[0]
        sums[f"principal_size_{key}"] = float(mask_size(numel, rho))
        sums[f"principal_changed_{key}"] = sums["changed"]
        sums[f"principal_numel_{key}"] = float(numel)
    cache.clear()

    if spec.read_fp32 is not None:
        for a, b in row_ranges(rows, cols, block_elems):
            w32, w2_32 = spec.read_fp32(a, b)
            for k, v in precision_counts(w32.to(device), w2_32.to(device)).items():
                sums[k] = sums.get(k, 0.0) + v

    return TensorResult(spec.name, tuple(shape), sums, values, spectrum, time.perf_counter() - start)


def _accumulate_grams(wt: torch.Tensor, dt: torch.Tensor, gram_w: torch.Tensor, cross: torch.Tensor,
                      gram_d: torch.Tensor, chunk_elems: int = GRAM_CHUNK_ELEMS) -> None:
    """G += WᵀW, C += WᵀΔ, D += ΔᵀΔ in fp64 for tall-frame rows, converting a few rows at a time."""
    step = max(1, chunk_elems // max(1, wt.shape[1]))
    for i in range(0, wt.shape[0], step):
        w64 = wt[i:i + step].to(torch.float64)
        d64 = dt[i:i + step].to(torch.float64)
        gram_w.addmm_(w64.T, w64)
        cross.addmm_(w64.T, d64)
        gram_d.addmm_(d64.T, d64)


def _recs(w: torch.Tensor, u: torch.Tensor, v_tall: torch.Tensor | None, ranks: list[tuple[float, int]],
          transposed: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(|W_r|, U) per ρ for one block, both in the tall frame's layout."""
    if v_tall is None or not ranks:
        return
    wt, ut = (w.T, u.T) if transposed else (w, u)
    for rec in reconstructions(wt.contiguous(), v_tall, [r for _, r in ranks]):
        yield rec, ut


def _randomized(block: tuple[torch.Tensor, torch.Tensor], transposed: bool
                ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Subspace sums, tall-frame V and top-64 Δ spectrum from randomized factorizations."""
    w, d = block
    n_t = min(w.shape)
    q = min(n_t, math.floor(max(RHOS) * n_t) + 10)
    with torch.random.fork_rng(devices=[]):  # deterministic sketches, caller's RNG untouched
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=q, niter=2)
        u2, s2, _ = torch.svd_lowrank(w + d, q=q, niter=2)
        spectrum = randomized_singular_values(d)
    sums = subspace_sums_direct(d, u, s, v, u2, s2)
    sums.update(size_sums(w, d))
    return sums, (u if transposed else v), spectrum
