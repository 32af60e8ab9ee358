"""The source-weights caveat: what a dequantized GGUF base means for sparsity and near-zero findings.

`opdlab analyze` records `base_format` in analysis.json when the base folder was dequantized
from a GGUF file, and `summary.base_exact_zero_fraction` for every analysis. Pure functions from
those parsed dicts to text; no file access.

    note = gguf_note(analysis, fp32_analysis)    # the paragraph for the precision section, or ""
    clause = gguf_clause(analysis)               # the short form for the findings rows 1 and 7
"""

from __future__ import annotations

import math
from typing import Any

# Unquantized GGUF storage types: tensors of these kinds are not on a quantization grid.
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def gguf_format(analysis: dict[str, Any] | None) -> dict[str, Any] | None:
    """analysis.json's `base_format` when it says the base is a dequantized GGUF file, else None."""
    fmt = (analysis or {}).get("base_format")
    return fmt if isinstance(fmt, dict) and fmt.get("kind") == "gguf" else None


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        return None
    return float(x)


def zero_fraction(analysis: dict[str, Any] | None) -> float | None:
    """summary.base_exact_zero_fraction as a finite float, or None when absent."""
    return _number(((analysis or {}).get("summary") or {}).get("base_exact_zero_fraction"))


def fine_pct(x: float | None) -> str:
    """A small percentage with its significant digits kept (0.00041 -> '0.041%'); 'not measured' for None."""
    if x is None:
        return "not measured"
    return "0%" if x == 0 else f"{100 * x:.2g}%"


def type_counts(fmt: dict[str, Any]) -> str:
    """'210 Q4_1, 61 F32, 1 Q8_0' from the recorded tensor types (most frequent first)."""
    types = fmt.get("tensor_types")
    items = [(str(k), v) for k, v in types.items()] if isinstance(types, dict) else []
    items.sort(key=lambda kv: (-(kv[1] if isinstance(kv[1], int) else 0), kv[0]))
    return ", ".join(f"{v} {k}" for k, v in items) or "types not recorded"


def quantized_types(fmt: dict[str, Any]) -> list[str]:
    types = fmt.get("tensor_types")
    return sorted(k for k in types if k not in _FLOAT_TYPES) if isinstance(types, dict) else []


def _grid_sentence(quant: list[str]) -> str:
    """How the quantized weights are laid out, in the terms the caveat needs (levels, zeros)."""
    if "Q4_1" in quant:
        text = ("In Q4_1 every block of 32 weights is stored as 4-bit integers q = 0…15 with a per-block scale d "
                "and offset m and read back as d·q + m, so each block sits on a 16-level grid and a weight is "
                "exactly zero only by coincidence.")
    elif quant:
        text = (f"Quantized tensors ({', '.join(quant)}) store each block of weights as small integers times a "
                "per-block scale (plus an offset in the _1 / K types), so each block sits on a grid of a few levels.")
    else:
        return "No tensor was quantized, so the weights are not on a grid."
    if "Q8_0" in quant:
        text += (" Q8_0 tensors (d·q with q = −127…127, here typically the embedding) can hold exact zeros "
                 "where q = 0.")
    return text


def gguf_note(analysis: dict[str, Any] | None, fp32: dict[str, Any] | None = None, name: str = "") -> str:
    """The source-weights paragraph for an analysis whose base is a dequantized GGUF file ("" otherwise).

    `fp32` is the same pair analysed in fp32, when there is one; its sparsity is the comparison
    the paragraph asks for.
    """
    fmt = gguf_format(analysis)
    if fmt is None:
        return ""
    summary = (analysis or {}).get("summary") or {}
    dtype = str((analysis or {}).get("dtype") or "bf16")
    where = f" ({fmt['source']})" if isinstance(fmt.get("source"), str) and fmt["source"] else ""
    zeros = f"Measured: {fine_pct(zero_fraction(analysis))} of the base's coordinates are exactly 0 in {dtype}"
    z32 = zero_fraction(fp32)
    zeros += f" ({fine_pct(z32)} in fp32)." if fp32 is not None and z32 is not None else "."
    s16, s32 = _number(summary.get("sparsity")), _number(summary.get("sparsity_fp32"))
    if s32 is None and fp32 is not None:
        s32 = _number((fp32.get("summary") or {}).get("sparsity"))
    if s16 is not None and s32 is not None and dtype == "bf16":
        compare = f" Here: {100 * s16:.1f}% unchanged in bf16 vs {100 * s32:.1f}% in fp32."
    else:
        compare = (" No fp32 figure was found for this pair; save fp32 checkpoints (--save-dtype both) and "
                   "analyze with --dtype fp32 to see it.")
    return (f"Source weights{' of ' + name if name else ''}: the base model was dequantized from a GGUF file"
            f"{where}; its tensors: {type_counts(fmt)}. {_grid_sentence(quantized_types(fmt))} {zeros} "
            "Two consequences. The near-zero mask of the low-magnitude enrichment (claim 7) is the smallest "
            "10 % of |W| on this grid: small grid levels, not weights that are zero. And a fine-tuned copy "
            "stored in bf16 is a rounding of grid values plus a small update, so its bf16 sparsity counts the "
            "coordinates whose update stayed below half a bf16 ULP of the weight, not the coordinates "
            f"training left alone: compare it with the fp32 analysis.{compare}")


def gguf_clause(analysis: dict[str, Any] | None) -> str:
    """The short source-weights caveat for a findings row ("" when the base is not a dequantized GGUF)."""
    fmt = gguf_format(analysis)
    if fmt is None:
        return ""
    quant = quantized_types(fmt)
    return (f"source weights dequantized from GGUF ({'/'.join(quant) or 'unquantized'} grid; "
            f"exact zeros in the base: {fine_pct(zero_fraction(analysis))}); see the precision section")
