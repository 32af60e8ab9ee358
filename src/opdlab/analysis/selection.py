"""Exact sums over the k largest (or smallest) values of a stream of row blocks, in two passes.

Why: the coordinate-energy and magnitude-mask metrics need "the top ⌈ρn⌉ entries" of a
tensor that may be too large to hold as fp32 (a 151936 × 896 embedding, or its rank-r
reconstruction). Non-negative fp32 values sort like their int32 bit patterns, so a radix
select finds the exact k-th value: pass 1 histograms the high 16 bits (sign, exponent and
7 mantissa bits), pass 2 the low 16 bits inside the one bucket that holds the k-th value.
Memory is a few 65,536-bin histograms per k, whatever the tensor size.

Ties at the k-th value are split evenly: the selected set takes the share of tied entries
it needs, and the weight sum counts that share of the tied entries' weight — the
expectation over a uniformly random tie-break. This matters for bf16 weights, where |W|
takes few distinct values.

A weight is either a bool mask (summed as a count, in the same bincount as the values)
or a float tensor (summed in fp64).

Example::

    sel = TopKSum(ks=[10, 100], largest=False)
    for v, u in blocks(): sel.add_pass1(v, u)
    for v, u in blocks(): sel.add_pass2(v, u)
    sel.result()   # [Σu over the 10 smallest v, Σu over the 100 smallest v]
"""

from __future__ import annotations

import torch

_BINS = 1 << 16


def _keys(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of non-negative fp32 values (order-preserving), flattened.

    Callers pass |x|, which never carries a sign bit (abs(-0.0) is +0.0).
    """
    return values.to(torch.float32).reshape(-1).contiguous().view(torch.int32)


class TopKSum:
    """Σ weight over the k largest (or smallest) values, for several k at once (see module docs).

    With `clamp_k`, a k larger than the number of values seen selects them all (used when
    the caller streams only the nonzero entries of a tensor whose zeros carry no weight).
    """

    def __init__(self, ks: list[int], largest: bool, clamp_k: bool = False) -> None:
        self.ks = [int(k) for k in ks]
        self.largest = largest
        self.clamp_k = clamp_k
        self.total = 0
        self.count1: torch.Tensor | None = None
        self.weight1: torch.Tensor | None = None
        self._plan: list[tuple[int, float, float, int]] | None = None  # per k: bucket, count/weight before, k
        self.count2: list[torch.Tensor] = []
        self.weight2: list[torch.Tensor] = []

    def _ordered(self, hist: torch.Tensor) -> torch.Tensor:
        """Bins in selection order: descending values for `largest`, ascending otherwise."""
        return hist.flip(0) if self.largest else hist

    @staticmethod
    def _hist(idx: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(count per bin, weight per bin) in fp64 for 16-bit bin indices."""
        if weight.dtype == torch.bool:  # one bincount over (bin, mask bit) pairs, in int32 to save memory
            both = torch.bincount(idx * 2 + weight.reshape(-1), minlength=2 * _BINS)
            both = both.view(_BINS, 2).to(torch.float64)
            return both.sum(1), both[:, 1]
        counts = torch.bincount(idx, minlength=_BINS).to(torch.float64)
        return counts, torch.bincount(idx, weights=weight.reshape(-1).to(torch.float64), minlength=_BINS)

    # -- pass 1: histogram of the high 16 bits
    def add_pass1(self, values: torch.Tensor, weight: torch.Tensor) -> None:
        keys = _keys(values)
        counts, weights = self._hist(keys >> 16, weight)
        if self.count1 is None:
            self.count1, self.weight1 = counts, weights
        else:
            self.count1 += counts
            self.weight1 += weights
        self.total += keys.numel()

    def _finish_pass1(self) -> None:
        if self.count1 is None:
            raise ValueError("TopKSum: no values were added")
        assert self.weight1 is not None
        cum = self._ordered(self.count1).cumsum(0)
        wcum = self._ordered(self.weight1).cumsum(0)
        self._plan = []
        for k in self.ks:
            if self.clamp_k:
                k = min(k, self.total)
            if not 0 < k <= self.total:
                self._plan.append((-1, 0.0, 0.0, k))  # nothing selected
                continue
            j = int(torch.searchsorted(cum, torch.tensor([float(k)], dtype=torch.float64, device=cum.device)))
            bucket = (_BINS - 1 - j) if self.largest else j
            before = float(cum[j - 1]) if j > 0 else 0.0
            w_before = float(wcum[j - 1]) if j > 0 else 0.0
            self._plan.append((bucket, before, w_before, k))
        self.count2 = [torch.zeros_like(self.count1) for _ in self.ks]
        self.weight2 = [torch.zeros_like(self.count1) for _ in self.ks]

    # -- pass 2: histogram of the low 16 bits inside each k's bucket
    def add_pass2(self, values: torch.Tensor, weight: torch.Tensor) -> None:
        if self._plan is None:
            self._finish_pass1()
        assert self._plan is not None
        keys = _keys(values)
        hi = keys >> 16
        flat_w = weight.reshape(-1)
        for i, (bucket, _, _, _) in enumerate(self._plan):
            if bucket < 0:
                continue
            sel = hi == bucket
            counts, weights = self._hist(keys[sel] & 0xFFFF, flat_w[sel])
            self.count2[i] += counts
            self.weight2[i] += weights

    def result(self) -> list[float]:
        """Per k: Σ weight over the selected k entries (ties split evenly)."""
        if self._plan is None:
            self._finish_pass1()
        assert self._plan is not None
        out = []
        for i, (bucket, before, w_before, k) in enumerate(self._plan):
            if bucket < 0:
                out.append(0.0)
                continue
            counts, weights = self._ordered(self.count2[i]), self._ordered(self.weight2[i])
            cum = counts.cumsum(0) + before
            j = int(torch.searchsorted(cum, torch.tensor([float(k)], dtype=torch.float64, device=cum.device)))
            inside = float(cum[j - 1]) if j > 0 else before
            share = (k - inside) / float(counts[j])  # fraction of the tied entries the selection takes
            out.append(w_before + float(weights[:j].sum()) + share * float(weights[j]))
        return out
