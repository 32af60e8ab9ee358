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

A weight is either a bool mask (summed as a count) or a float tensor (summed in fp64).

Two shortcuts keep the answers exact and save passes:
  * bf16 values have no low 16 bits, so when every value added was bf16 the high-16-bit
    bucket *is* the value: pass 2 is skipped and the whole bucket is the tie (|W| in a
    bf16 analysis: the low-magnitude masks).
  * `select_sums` runs both passes on one in-memory tensor, computing its keys once and
    scanning once per distinct bucket.

Example::

    sel = TopKSum(ks=[10, 100], largest=False)
    for v, u in blocks(): sel.add_pass1(v, u)
    for v, u in blocks(): sel.add_pass2(v, u)
    sel.result()   # [Σu over the 10 smallest v, Σu over the 100 smallest v]
    select_sums(v, u, [10, 100], largest=False)   # the same, for one in-memory tensor
"""

from __future__ import annotations

import torch

_BINS = 1 << 16


def _keys(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of non-negative fp32 values (order-preserving), flattened.

    Callers pass |x|, which never carries a sign bit (abs(-0.0) is +0.0).
    """
    return values.to(torch.float32).reshape(-1).contiguous().view(torch.int32)


def _hist(idx: torch.Tensor, weight: torch.Tensor, bins: int = _BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """(count per bin, weight per bin) in fp64 for bin indices in [0, bins)."""
    weight = weight.reshape(-1)
    counts = torch.bincount(idx, minlength=bins).to(torch.float64)
    if weight.dtype == torch.bool:  # the count of the selected entries: a bincount of those alone
        return counts, torch.bincount(idx[weight], minlength=bins).to(torch.float64)
    return counts, torch.bincount(idx, weights=weight.to(torch.float64), minlength=bins)


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
        self.all_bf16 = True  # every value added so far was bf16: the high 16 bits are the value
        self.count1: torch.Tensor | None = None
        self.weight1: torch.Tensor | None = None
        self._plan: list[tuple[int, float, float, int]] | None = None  # per k: bucket, count/weight before, k
        self.count2: dict[int, torch.Tensor] = {}  # per bucket: low-16-bit histograms
        self.weight2: dict[int, torch.Tensor] = {}

    def _ordered(self, hist: torch.Tensor) -> torch.Tensor:
        """Bins in selection order: descending values for `largest`, ascending otherwise."""
        return hist.flip(0) if self.largest else hist

    # -- pass 1: histogram of the high 16 bits
    def add_pass1(self, values: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor | None = None,
                  hi: torch.Tensor | None = None) -> None:
        """Histogram one block (`keys`/`hi`: its `_keys` and their high 16 bits, if computed already)."""
        self.all_bf16 = self.all_bf16 and values.dtype == torch.bfloat16
        keys = _keys(values) if keys is None else keys
        counts, weights = _hist(keys >> 16 if hi is None else hi, weight)
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
        for bucket in self.buckets():
            self.count2[bucket] = torch.zeros_like(self.count1)
            self.weight2[bucket] = torch.zeros_like(self.count1)

    def buckets(self) -> list[int]:
        """The distinct high-16-bit buckets pass 2 must scan (none when pass 2 is not needed)."""
        if self._plan is None:
            self._finish_pass1()
        assert self._plan is not None
        if self.all_bf16:
            return []
        return sorted({b for b, _, _, _ in self._plan if b >= 0})

    @property
    def needs_pass2(self) -> bool:
        return bool(self.buckets())

    # -- pass 2: histogram of the low 16 bits inside each k's bucket
    def add_pass2(self, values: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor | None = None,
                  hi: torch.Tensor | None = None) -> None:
        buckets = self.buckets()
        if not buckets:
            return
        keys = _keys(values) if keys is None else keys
        hi = keys >> 16 if hi is None else hi
        flat_w = weight.reshape(-1)
        for bucket in buckets:
            idx = (hi == bucket).nonzero().squeeze(1)  # one scan of the mask, then small gathers
            counts, weights = _hist(keys[idx] & 0xFFFF, flat_w[idx])
            self.count2[bucket] += counts
            self.weight2[bucket] += weights

    def result(self) -> list[float]:
        """Per k: Σ weight over the selected k entries (ties split evenly)."""
        if self._plan is None:
            self._finish_pass1()
        assert self._plan is not None and self.count1 is not None and self.weight1 is not None
        out = []
        for bucket, before, w_before, k in self._plan:
            if bucket < 0:
                out.append(0.0)
                continue
            if self.all_bf16:  # the bucket holds one value: all its entries are tied
                count, weight = float(self.count1[bucket]), float(self.weight1[bucket])
                out.append(w_before + (k - before) / count * weight)
                continue
            counts, weights = self._ordered(self.count2[bucket]), self._ordered(self.weight2[bucket])
            cum = counts.cumsum(0) + before
            j = int(torch.searchsorted(cum, torch.tensor([float(k)], dtype=torch.float64, device=cum.device)))
            inside = float(cum[j - 1]) if j > 0 else before
            share = (k - inside) / float(counts[j])  # fraction of the tied entries the selection takes
            out.append(w_before + float(weights[:j].sum()) + share * float(weights[j]))
        return out


def select_sums(values: torch.Tensor, weight: torch.Tensor, ks: list[int], largest: bool,
                clamp_k: bool = False) -> list[float]:
    """`TopKSum` on one in-memory tensor: both passes, keys computed once."""
    sel = TopKSum(ks, largest, clamp_k)
    keys = _keys(values)
    hi = keys >> 16
    sel.add_pass1(values, weight, keys, hi)
    sel.add_pass2(values, weight, keys, hi)
    return sel.result()
