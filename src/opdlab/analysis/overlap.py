"""Overlap of two runs' changed masks from the same base, streamed tensor by tensor (DESIGN 7).

Example::

    rows = overlap_rows("base/", "runs/a", "runs/b", dtype="bf16", atol=0.0)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from opdlab.analysis.aggregate import classify, ordered_groups
from opdlab.analysis.blocks import row_ranges
from opdlab.analysis.metrics_overlap import COUNT_KEYS, add_counts, overlap_counts, overlap_stats
from opdlab.analysis.metrics_sparsity import changed_mask
from opdlab.analysis.pairs import Checkpoint, analyzable, match_tensors, read_checked
from opdlab.analysis.per_tensor import BLOCK_ELEMS
from opdlab.analysis.stream import DTYPES


@dataclass
class OverlapResult:
    rows: list[dict[str, Any]]  # per tensor: name, layer, module, block, counts, stats
    skipped: list[str] = field(default_factory=list)


def overlap_rows(base: str | Path, run_a: str | Path, run_b: str | Path, dtype: str, atol: float,
                 device: str = "cpu", skip_mismatched: bool = False, progress: bool = True) -> OverlapResult:
    """Per-tensor overlap counts of U_A = |A − base| > atol and U_B = |B − base| > atol."""
    fp32 = dtype == "fp32"  # fp32 weights where they exist (a run's final-fp32/), as in analysis/stream.py
    b, a, c = (Checkpoint(p, prefer_fp32=fp32) for p in (base, run_a, run_b))
    m_a = match_tensors(b, a, skip_mismatched=skip_mismatched)
    m_b = match_tensors(b, c, skip_mismatched=skip_mismatched)
    skipped = [f"{p} [run A]" for p in m_a.problems] + [f"{p} [run B]" for p in m_b.problems]
    names_b = set(m_b.names)
    names, not_measured = analyzable([b, a, c], [n for n in m_a.names if n in names_b])
    skipped += not_measured
    torch_dtype = DTYPES[dtype]
    rows = []
    for name in tqdm(names, desc="compare", unit="tensor", file=sys.stderr, disable=not progress):
        shape = b.shape(name)
        n_rows = min(m_a.rows.get(name, shape[0] if shape else 1), m_b.rows.get(name, shape[0] if shape else 1))
        row_elems = 1
        for d in shape[1:]:
            row_elems *= d
        counts: dict[str, int] = {}
        for lo, hi in row_ranges(n_rows, row_elems, BLOCK_ELEMS) if len(shape) >= 2 else [(0, 1)]:
            w = read_checked(*b.location(name), lo, hi, torch_dtype).to(device)
            ua = changed_mask(w, read_checked(*a.location(name), lo, hi, torch_dtype).to(device), atol)
            ub = changed_mask(w, read_checked(*c.location(name), lo, hi, torch_dtype).to(device), atol)
            add_counts(counts, overlap_counts(ua, ub))
        layer, module, block = classify(name)
        rows.append({"name": name, "layer": "" if layer is None else layer, "module": module, "block": block,
                     **counts, **overlap_stats(counts)})
    return OverlapResult(rows, skipped)


def overlap_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group tables by module, layer and block: stats of summed counts."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in ("module", "layer", "block"):
        sums: dict[Any, dict[str, int]] = {}
        for r in rows:
            key = r[kind] if r[kind] != "" else "none"
            add_counts(sums.setdefault(key, {}), {k: r[k] for k in COUNT_KEYS})
        out[kind] = [{"group": k, **sums[k], **overlap_stats(sums[k])} for k in ordered_groups(sums, kind)]
    return out


def overlap_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, int] = {}
    for r in rows:
        add_counts(total, {k: r[k] for k in COUNT_KEYS})
    return {**overlap_stats(total), "num_params": total.get("n", 0), "num_tensors": len(rows)}


