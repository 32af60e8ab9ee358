"""Every metric of one tensor pair, streamed over row blocks (the work unit of `opdlab analyze`).

A tensor that fits in one block (every tensor of a 0.5B model but the embedding) is read once
and kept; each metric family then makes one pass over it. Larger tensors are streamed in
row blocks, with three passes:
  A. ΣW², the count of exact zeros in W, the Grams of the tall frame (2-D tensors:
     G = WᵀW and C = WᵀΔ in fp32 per block, D = ΔᵀΔ in fp64), the counts that need no
     rms(W), and pass 1 of the exact selections (low-magnitude mask, coordinate energy);
  —  then one eigh of G, one of W' in G's eigenbasis (metrics_subspace) and eigvalsh(D)
     (the exact spectrum of Δ) serve every ρ;
  B. the τ·rms(W) counts (they need rms(W) of the whole tensor), pass 2 of those
     selections, and pass 1 of the principal-mask selections (|W_r| for every ρ in one product);
  C. pass 2 of the principal-mask selections;
plus one pass over the fp32 checkpoints for the precision control when they exist.

Precision: D is fp64 because the rank tolerances reach 1e-6·σ₁ (λ = σ² down to 1e-12·λ₁);
G and C only feed W's singular vectors and W' in their basis, where fp32 is as accurate as
the weights (metrics_subspace documents the measured error), so frames at least
FP32_GRAM_MIN wide build them in fp32; narrower ones, where fp64 costs nothing, in fp64. Selections are exact in any
dtype (selection.py). Matrices whose smaller side exceeds `exact_svd_max` are read whole
and use randomized factorizations instead (see metrics_spectrum / metrics_subspace).
Tensors with more than two dimensions (convolution kernels) are viewed as (shape[0], rest).
1-D tensors get the element-wise metrics only.

Peak memory: one block of W and Δ in fp32 and one |W_r|, plus three n×n Grams and
selection histograms.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from opdlab.analysis.blocks import row_ranges
from opdlab.analysis.metrics_magnitude import mask_size, principal_ranks, reconstructions
from opdlab.analysis.metrics_size import COORD_PERCENTS, coord_k, coord_key
from opdlab.analysis.metrics_sparsity import ATOL_LOOSE, EPSILONS, TAUS, fmt
from opdlab.analysis.metrics_spectrum import gram_singular_values, randomized_singular_values, spectrum_metrics
from opdlab.analysis.metrics_subspace import RHOS, subspace_sums_direct, subspace_sums_gram
from opdlab.analysis.precision import precision_counts
from opdlab.analysis.selection import TopKSum, select_sums

BLOCK_ELEMS = 1 << 23  # tensors up to 8.4 M entries are held whole (32 MB per fp32 copy); larger ones are streamed
STREAM_BLOCK_ELEMS = 1 << 22  # in row blocks of at most 4.2 M entries (16 MB per fp32 copy)
GRAM_CHUNK_ELEMS = 1 << 20  # rows converted to fp64 at a time for D (8 MB each)
SYM_GRAM_MIN = 256  # symmetric Grams at least this wide are built block-triangularly (5/8 of the work)
FP32_GRAM_MIN = 256  # tall frames at least this wide factor W in fp32 (below, fp64 costs next to nothing)

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


class _Block:
    """One row block: W in the analysis dtype, W and Δ in fp32, and what is derived from them once."""

    def __init__(self, w: torch.Tensor, w2: torch.Tensor, device: str, shape: tuple[int, ...]) -> None:
        w = w.to(device).reshape(shape)
        self.w_abs = w.abs()  # in the analysis dtype: bf16 |W| needs one selection pass only
        self.w32 = w.to(torch.float32)
        self.d = w2.to(device=device, dtype=torch.float32).reshape(shape) - self.w32
        self.changed = self.d != 0  # U (atol 0)
        nz = self.d[self.changed]
        self.nz_abs = nz.abs()  # |Δ| of the changed entries: zeros carry no energy and sort last
        self.nz_sq = nz.double().square()  # exact squares of fp32 Δ


def _counts_without_rms(b: _Block) -> dict[str, float]:
    """Changed counts, |Δ| < ε counts and exact zeros of W (all thresholds positive: zeros count below)."""
    a, zeros = b.nz_abs, float(b.d.numel() - b.nz_abs.numel())
    out = {"changed": float(a.numel()), f"changed_atol_{fmt(ATOL_LOOSE)}": float(torch.count_nonzero(a > ATOL_LOOSE)),
           "source_zero": float(b.w32.numel() - torch.count_nonzero(b.w32))}
    for e in EPSILONS:
        out[f"n_below_eps_{fmt(e)}"] = zeros + float(torch.count_nonzero(a < e))
    return out


def _counts_with_rms(b: _Block, rms: float) -> dict[str, float]:
    zeros = float(b.d.numel() - b.nz_abs.numel())
    return {f"n_below_rms_{fmt(t)}": zeros + float(torch.count_nonzero(b.nz_abs < t * rms)) for t in TAUS}


def _add(sums: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        sums[k] = sums.get(k, 0.0) + v


class _Grams:
    """Tall-frame Grams summed over row blocks: D in fp64; G and C in fp32 per block when n is
    large enough for it to save time (FP32_GRAM_MIN), else in fp64 like D."""

    def __init__(self, n: int, device: str, streamed: bool) -> None:
        self.fast = n >= FP32_GRAM_MIN
        self.block_dtype = torch.float32 if self.fast else torch.float64
        acc = torch.float64 if streamed or not self.fast else torch.float32  # fp32 blocks add up in fp64
        self.g = torch.zeros(n, n, dtype=acc, device=device)
        self.c = torch.zeros(n, n, dtype=acc, device=device)
        self.d = torch.zeros(n, n, dtype=torch.float64, device=device)

    def add(self, wt: torch.Tensor, dt: torch.Tensor) -> None:
        """Add the Grams of tall-frame rows `wt`, `dt` (fp32)."""
        step = max(1, GRAM_CHUNK_ELEMS // max(1, dt.shape[1]))
        if self.fast:
            g = self.g if self.g.dtype == torch.float32 else torch.zeros_like(self.g, dtype=torch.float32)
            _sym_gram_(g, wt)
            if g is not self.g:
                self.g += g.to(self.g.dtype)
            self.c += (wt.T @ dt).to(self.c.dtype)
        for i in range(0, dt.shape[0], step):
            d64 = dt[i:i + step].to(torch.float64)
            _sym_gram_(self.d, d64)
            if not self.fast:
                w64 = wt[i:i + step].to(torch.float64)
                _sym_gram_(self.g, w64)
                self.c.addmm_(w64.T, d64)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G — fp32 when fast, else fp64 —, C, D in fp64), symmetric where they should be."""
        return _mirror(self.g).to(self.block_dtype), self.c, _mirror(self.d)


def _edges(n: int) -> list[tuple[int, int]]:
    parts = 4 if n >= SYM_GRAM_MIN else 1
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _sym_gram_(out: torch.Tensor, x: torch.Tensor) -> None:
    """out += xᵀx on the diagonal blocks and the blocks above them (`_mirror` fills the rest)."""
    for a, b in _edges(x.shape[1]):
        out[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


def _mirror(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle `m` holds."""
    return torch.triu(m) + torch.triu(m, 1).T


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
    whole = (not is_matrix) or transposed or randomized or numel <= block_elems
    ranges = [(0, rows)] if whole else row_ranges(rows, cols, min(block_elems, STREAM_BLOCK_ELEMS))
    streamed = len(ranges) > 1
    kept: list[_Block] = []

    def blocks() -> Iterator[_Block]:
        if kept:
            yield from kept
            return
        for a, b in ranges:
            w, w2 = spec.read(a, b)
            blk = _Block(w, w2, device, (b - a, cols) if is_matrix else (-1,))
            del w, w2
            if not streamed:
                kept.append(blk)
            yield blk

    sums: dict[str, float] = {"numel": float(numel), "source_sq": 0.0, "delta_sq": 0.0}
    low_ks = [mask_size(numel, r) for r in RHOS]
    coord_ks = [coord_k(numel, p) for p in COORD_PERCENTS]
    low_sel = TopKSum(low_ks, largest=False)
    coord_sel = TopKSum(coord_ks, largest=True, clamp_k=True)
    n_t = min(rows, cols)
    grams = _Grams(n_t, device, streamed) if is_matrix and not randomized else None

    # ---- pass A
    for blk in blocks():
        sums["source_sq"] += float(blk.w32.square().sum())  # fp32 cascade sum: ~3e-8 relative
        if grams is None:  # 2-D tensors take ΣΔ² from D's trace (fp64)
            sums["delta_sq"] += float(blk.nz_sq.sum())
        _add(sums, _counts_without_rms(blk))
        low_sel.add_pass1(blk.w_abs, blk.changed)
        coord_sel.add_pass1(blk.nz_abs, blk.nz_sq)
        if grams is not None:
            grams.add(blk.w32.T if transposed else blk.w32, blk.d.T if transposed else blk.d)

    values: dict[str, float | str] = {"svd_method": ""}
    spectrum = None
    v_tall: torch.Tensor | None = None  # right singular vectors of the tall frame, for the principal masks
    if is_matrix:
        if grams is not None:
            gram_w, cross, gram_d = grams.finish()
            grams = None
            sums["delta_sq"] = float(gram_d.trace())
            sub, v_tall = subspace_sums_gram(gram_w, cross, gram_d, rows, cols, transposed)
            del gram_w, cross
            spectrum = gram_singular_values(gram_d).cpu()
            values["svd_method"] = "gram"
        else:
            blk = kept[0] if kept else next(blocks())
            sub, v_tall, spectrum = _randomized(blk.w32, blk.d, transposed)
            values["svd_method"] = "randomized"
        sums.update(sub)
        values.update(spectrum_metrics(spectrum, sums["delta_sq"], n_t, complete=not randomized))

    # ---- pass B: counts that need rms(W), second passes, principal masks (pass C: streamed only)
    rms = math.sqrt(sums["source_sq"] / numel) if numel else 0.0
    ranks = principal_ranks(n_t) if is_matrix and v_tall is not None else []
    sizes = [mask_size(numel, rho) for rho, _ in ranks]
    principal_sel = [TopKSum([k], largest=True) for k in sizes]
    principal: list[float] = []
    for blk in blocks():
        _add(sums, _counts_with_rms(blk, rms))
        low_sel.add_pass2(blk.w_abs, blk.changed)
        coord_sel.add_pass2(blk.nz_abs, blk.nz_sq)
        for i, (rec, ut) in enumerate(_recs(blk, v_tall, ranks, transposed)):
            if streamed:
                principal_sel[i].add_pass1(rec, ut)
            else:  # in memory: both selection passes on this |W_r| now
                principal.append(select_sums(rec, ut, [sizes[i]], largest=True)[0])
    if streamed and ranks:
        for blk in blocks():
            for sel, (rec, ut) in zip(principal_sel, _recs(blk, v_tall, ranks, transposed)):
                sel.add_pass2(rec, ut)
        principal = [sel.result()[0] for sel in principal_sel]

    for rho, k, hits in zip(RHOS, low_ks, low_sel.result()):
        sums[f"low_mag_hits_{_rho(rho)}"], sums[f"low_mag_size_{_rho(rho)}"] = hits, float(k)
    for p, mass in zip(COORD_PERCENTS, coord_sel.result()):
        sums[f"{coord_key(p)}_mass"] = mass
    for (rho, _), size, hits in zip(ranks, sizes, principal):
        key = _rho(rho)
        sums[f"principal_hits_{key}"] = hits
        sums[f"principal_size_{key}"] = float(size)
        sums[f"principal_changed_{key}"] = sums["changed"]
        sums[f"principal_numel_{key}"] = float(numel)
    kept.clear()

    if spec.read_fp32 is not None:
        for a, b in row_ranges(rows, cols, block_elems):
            w32, w2_32 = spec.read_fp32(a, b)
            _add(sums, precision_counts(w32.to(device), w2_32.to(device)))

    return TensorResult(spec.name, tuple(shape), sums, values, spectrum, time.perf_counter() - start)


def _recs(blk: _Block, v_tall: torch.Tensor | None, ranks: list[tuple[float, int]], transposed: bool
          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(|W_r|, U) per ρ for one block, both in the tall frame's layout (nothing without ranks)."""
    if v_tall is None or not ranks:
        return
    wt, ut = (blk.w32.T.contiguous(), blk.changed.T.contiguous()) if transposed else (blk.w32, blk.changed)
    for rec in reconstructions(wt, v_tall, [r for _, r in ranks]):
        yield rec, ut


def _randomized(w: torch.Tensor, d: torch.Tensor, transposed: bool
                ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Subspace sums, tall-frame V and top-64 Δ spectrum from randomized factorizations."""
    n_t = min(w.shape)
    q = min(n_t, math.floor(max(RHOS) * n_t) + 10)
    with torch.random.fork_rng(devices=[]):  # deterministic sketches, caller's RNG untouched
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=q, niter=2)
        u2, s2, _ = torch.svd_lowrank(w + d, q=q, niter=2)
        spectrum = randomized_singular_values(d)
    return subspace_sums_direct(d, u, s, v, u2, s2), (u if transposed else v), spectrum
