"""Tables by layer, module type and block; the model-wide summary.

Groups add only additive quantities (counts, sums of squares, projected energies, hit
counts) and derive every ratio from the sums with the same `derive` used for one tensor,
so a group's sparsity is exactly 1 − Σchanged/Σn (numel-weighted), its relative update
norm √(ΣΔ²/ΣW²), its projection energy Σ(projected energy)/ΣΔ² over its 2-D tensors.
Spectrum-of-Δ metrics are not additive; groups report their median over 2-D tensors
(NaN values skipped).

`classify(name)` maps a canonical parameter name (see pairs.canonical_name) to
(layer, module, block) for Llama / Qwen2 / Qwen2.5-VL / LLaVA / Idefics3 style names.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any, Iterable

from opdlab.analysis.metrics_magnitude import magnitude_ratios
from opdlab.analysis.metrics_size import size_ratios
from opdlab.analysis.metrics_sparsity import sparsity_ratios
from opdlab.analysis.metrics_spectrum import spectrum_keys
from opdlab.analysis.metrics_subspace import subspace_ratios
from opdlab.analysis.precision import precision_ratios

MODULES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "vision", "projector", "other")
BLOCKS = ("attention", "mlp", "embedding", "norm", "vision", "projector", "other")
GROUP_KINDS = ("layer", "module", "block")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_VISION = re.compile(r"^(vision_tower|vision_model|visual|vision_encoder|image_encoder)\.")
_PROJECTOR = re.compile(r"^(multi_modal_projector|connector|mm_projector)\.|^visual\.merger\.")
_MODULE_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("q", re.compile(r"\.(q_proj|query|wq)\.")),
    ("k", re.compile(r"\.(k_proj|key|wk)\.")),
    ("v", re.compile(r"\.(v_proj|value|wv)\.")),
    ("o", re.compile(r"\.(o_proj|out_proj|wo|attention\.dense)\.")),
    ("gate", re.compile(r"\.(gate_proj|w1)\.")),
    ("up", re.compile(r"\.(up_proj|w3|fc1|c_fc)\.")),
    ("down", re.compile(r"\.(down_proj|w2|fc2|c_proj)\.")),
    ("embed", re.compile(r"(embed_tokens|wte|word_embeddings|tok_embeddings)\.")),
    ("lm_head", re.compile(r"^(lm_head|output)\.")),
    ("norm", re.compile(r"(norm|ln_\w+|layernorm)[\w]*\.(weight|bias)$")),
]
_BLOCK_OF = {"q": "attention", "k": "attention", "v": "attention", "o": "attention", "gate": "mlp", "up": "mlp",
             "down": "mlp", "embed": "embedding", "lm_head": "embedding", "norm": "norm", "vision": "vision",
             "projector": "projector", "other": "other"}


def classify(name: str) -> tuple[int | None, str, str]:
    """(decoder layer index or None, module type, block) of a canonical parameter name.

    Vision-tower and projector parameters are their own module types (layer None), so
    the layer table follows the language model's decoder layers.
    """
    if _PROJECTOR.search(name):
        return None, "projector", "projector"
    if _VISION.search(name):
        return None, "vision", "vision"
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    module = "other"
    for mod, pattern in _MODULE_PATTERNS:
        if pattern.search(name):
            module = mod
            break
    return layer, module, _BLOCK_OF[module]


def derive(sums: dict[str, float]) -> dict[str, float]:
    """Every ratio metric from additive sums (one tensor, or a group's sums)."""
    out: dict[str, float] = {}
    out.update(sparsity_ratios(sums))
    out.update(precision_ratios(sums))
    out.update(size_ratios(sums))
    out.update(subspace_ratios(sums))
    out.update(magnitude_ratios(sums))
    return out


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + v
    return total


def median(values: Iterable[Any]) -> float:
    """Median of the finite numbers in `values` (NaN when there are none)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return statistics.median(xs) if xs else math.nan


def tensor_rows(results: list[Any]) -> list[dict[str, Any]]:
    """One row per tensor: identity, numel, energies, every derived ratio and the spectrum values."""
    total_delta = sum(r.sums["delta_sq"] for r in results)
    rows = []
    for r in results:
        layer, module, block = classify(r.name)
        row: dict[str, Any] = {"name": r.name, "layer": "" if layer is None else layer, "module": module,
                               "block": block, "shape": "x".join(str(d) for d in r.shape),
                               "numel": int(r.sums["numel"]), "source_sq": r.sums["source_sq"],
                               "delta_sq": r.sums["delta_sq"],
                               "energy_share": r.sums["delta_sq"] / total_delta if total_delta > 0 else math.nan}
        row.update(derive(r.sums))
        row["svd_method"] = r.values.get("svd_method", "")
        for k in spectrum_keys():
            row[k] = r.values.get(k, math.nan)
        row["seconds"] = r.seconds
        rows.append(row)
    return rows


def ordered_groups(keys: Iterable[Any], kind: str) -> list[Any]:
    """Group keys in display order: layers numerically ("none" last), modules/blocks as listed above."""
    keys = sorted(set(keys), key=lambda k: (isinstance(k, str), k if isinstance(k, int) else 0, str(k)))
    order = MODULES if kind == "module" else BLOCKS if kind == "block" else None
    if order is None:
        return keys
    return [k for k in order if k in keys] + [k for k in keys if k not in order]


def group_table(results: list[Any], kind: str) -> list[dict[str, Any]]:
    """Rows of one grouping ("layer", "module" or "block"), in a stable order."""
    idx = GROUP_KINDS.index(kind)
    sums: dict[Any, dict[str, float]] = {}
    members: dict[Any, list[Any]] = {}
    for r in results:
        key = classify(r.name)[idx]
        key = "none" if key is None else key
        add_sums(sums.setdefault(key, {}), r.sums)
        members.setdefault(key, []).append(r)
    total_delta = sum(r.sums["delta_sq"] for r in results)
    rows = []
    for key in ordered_groups(sums, kind):
        s = sums[key]
        row: dict[str, Any] = {"group": key, "num_tensors": len(members[key]), "num_params": int(s["numel"]),
                               "delta_sq": s["delta_sq"],
                               "energy_share": s["delta_sq"] / total_delta if total_delta > 0 else math.nan}
        row.update(derive(s))
        for k in spectrum_keys():
            row[f"median_{k}"] = median(m.values.get(k) for m in members[key])
        rows.append(row)
    return rows


def summary(results: list[Any]) -> dict[str, Any]:
    """Model-wide figures: every derived ratio over all tensors, spectrum medians, counts."""
    total: dict[str, float] = {}
    for r in results:
        add_sums(total, r.sums)
    out: dict[str, Any] = {"num_params": int(total.get("numel", 0)), "num_tensors": len(results),
                           "num_matrices": sum(1 for r in results if r.values.get("svd_method"))}
    out.update(derive(total))
    for k in spectrum_keys():
        out[f"median_{k}"] = median(r.values.get(k) for r in results)
    methods = sorted({str(r.values.get("svd_method")) for r in results if r.values.get("svd_method")})
    out["svd_methods"] = ",".join(methods)
    return out
