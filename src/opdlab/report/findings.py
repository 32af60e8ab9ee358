"""The findings table: one row per claim of the study, decided by explicit rules on loaded data.

Pure functions from already-loaded dicts (analysis.json, subnetwork.json, ...) to
`Finding` rows; no file access, no weights. Every threshold is a named constant below
and is explained in docs/findings.md. Verdicts are "holds", "does not hold",
"inconclusive" (between the hold and fail thresholds, or too noisy), and "not measured"
(the inputs are absent).

    rows = build_findings(FindingInputs(analysis=json.load(open("analysis.json"))))
    print(format_table(rows))
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from opdlab.report.source_format import gguf_clause, zero_fraction

HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "does not hold", "inconclusive", "not measured"

# (1) small and coordinate-sparse (bf16 checkpoints, atol 0, as in the study)
SPARSITY_HOLDS_MIN = 0.5        # most coordinates bitwise unchanged
SPARSITY_FAILS_BELOW = 0.2
REL_UPDATE_SMALL_MAX = 0.01     # ‖Δ‖/‖W‖ at most 1 %
REL_UPDATE_LARGE_ABOVE = 0.05
# (2) spread across layers, FFN-heavy
SPREAD_HOLDS_MIN = 0.2          # least-moved layer / most-moved layer, by ‖Δ‖/‖W‖
SPREAD_FAILS_BELOW = 0.1
FFN_HEAVY_MIN = 1.1             # MLP ‖Δ‖/‖W‖ over attention ‖Δ‖/‖W‖
FFN_FAILS_BELOW = 1.0
# (3) subnetwork retraining: share of the full run's gain over the source that a masked run recovers
RECOVERY_HOLDS_MIN = 0.9
RECOVERY_FAILS_BELOW = 0.75
RANDOM_GAP_MIN = 0.1            # OPD-mask recovery minus random-mask recovery
MIN_GAIN_ACCURACY = 0.02        # the full run must beat the source by this (absolute accuracy) ...
MIN_GAIN_KL_FRACTION = 0.05     # ... or cut the source's eval reverse KL by this fraction
Z_NOISE = 2.0                   # accuracy gaps must exceed Z binomial standard errors when num_eval is known
# (4) AdamW vs SGD
ADAMW_MARGIN_ACCURACY = 0.02
ADAMW_MARGIN_KL_FRACTION = 0.05
# (5) full rank, spectrally concentrated
RANK_FULL_MIN = 0.9             # median numerical-rank fraction at tol 1e-5
RANK_FAILS_BELOW = 0.5
TOP8_HOLDS_MIN = 0.5            # median share of ‖Δ‖² in the top 8 singular values
TOP8_FAILS_BELOW = 0.25
FLAT_MULTIPLE_HOLDS = 3.0       # top-8 energy over a flat spectrum's min(8, r)/r
FLAT_MULTIPLE_FAILS = 1.5
# (6) off the principal subspaces (rho = 10 %)
PRINCIPAL_RATIO_HOLDS_MAX = 1.5  # E_both over its random baseline k²/(mn)
PRINCIPAL_RATIO_FAILS_ABOVE = 3.0
# (7) near-zero source weights (rho = 10 %)
LOW_MAG_HOLDS_MIN = 1.1
LOW_MAG_FAILS_MAX = 1.0
# (8) OPD vs SFT vs RL: a signature counts when SFT and RL differ on it by at least this
SIGNATURE_SEPARATION = {"sparsity": 0.05, "relative_update_norm": math.log(1.5),
                        "principal_energy_ratio": math.log(1.5), "low_magnitude_enrichment": math.log(1.1)}
SIGNATURES_MIN = 2              # discriminating signatures needed for a verdict
SIGNATURE_HOLDS_SHARE = 2 / 3   # share of them on which OPD is closer to RL than to SFT
SIGNATURE_FAILS_SHARE = 1 / 3

CLAIMS = {
    1: "Updates are small and coordinate-sparse",
    2: "Updates are spread across layers and FFN-heavy by relative movement",
    3: "Retraining only the OPD subnetwork nearly recovers full OPD; a random mask of equal density does not",
    4: "AdamW beats SGD for OPD",
    5: "Updates are numerically full-rank but spectrally concentrated",
    6: "Updates lie off the principal subspaces of the source weights",
    7: "Updates land disproportionately on near-zero source weights",
    8: "OPD keeps the parameter signatures of on-policy training (closer to RL than to SFT)",
}


@dataclass
class Finding:
    """One row of the findings table. `values` holds the numbers behind `measured` (None = absent)."""

    number: int
    claim: str
    verdict: str
    measured: str
    control: str
    rule: str
    caveat: str = ""
    source: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class FindingInputs:
    """Loaded inputs; any may be missing. Dicts are the parsed JSON files of docs/formats.md."""

    analysis: dict[str, Any] | None = None          # main (OPD, bf16) analysis.json
    analysis_name: str = ""
    analysis_fp32: dict[str, Any] | None = None     # same pair analysed in fp32
    tensors: list[dict[str, Any]] = field(default_factory=list)  # main tensors.csv rows
    by_method: dict[str, dict[str, Any]] = field(default_factory=dict)  # "opd"/"sft"/"rl" -> analysis.json
    method_labels: dict[str, str] = field(default_factory=dict)  # e.g. {"opd": "opsd"}: the label shown for a slot
    subnetwork: dict[str, Any] | None = None
    optimizers: dict[str, Any] | None = None
    lr_sweep: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- helpers


def num(x: Any) -> float | None:
    """A finite float, or None for missing / null / NaN / non-numbers."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:.3g}"


def _band(value: float, holds: Callable[[float], bool], fails: Callable[[float], bool]) -> str:
    return HOLDS if holds(value) else FAILS if fails(value) else INCONCLUSIVE


def combine(*verdicts: str) -> str:
    """All parts hold -> holds; any part fails -> does not hold; otherwise inconclusive."""
    if any(v == FAILS for v in verdicts):
        return FAILS
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE


def not_measured(number: int, missing: str, rule: str) -> Finding:
    return Finding(number, CLAIMS[number], NOT_MEASURED, "—", "—", rule, caveat=f"needs {missing}")


def binomial_se(p: float, n: float) -> float:
    """Standard error of an accuracy p measured on n examples."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def gap_is_noise(p_a: float, p_b: float, n: float | None) -> bool:
    """True when the accuracy gap p_a - p_b is within Z_NOISE standard errors (n unknown -> False)."""
    if not n:
        return False
    se = math.sqrt(binomial_se(p_a, n) ** 2 + binomial_se(p_b, n) ** 2)
    return abs(p_a - p_b) <= Z_NOISE * se


def rounding_share(sparsity_bf16: float | None, sparsity_fp32: float | None,
                   below_half_ulp: float | None, rounded_away: float | None = None) -> float | None:
    """Share of the bf16-unchanged coordinates that did change in fp32 (rounded away by storage).

    From the most direct figure available: rounded_away/s_bf16 (changed in fp32, identical
    in bf16), else (s_bf16 − s_fp32)/s_bf16, else below_half_ulp/s_bf16 (the half-ULP rule's
    prediction); capped to [0, 1].
    """
    if not sparsity_bf16:
        return None
    if rounded_away is not None:
        share = rounded_away / sparsity_bf16
    elif sparsity_fp32 is not None:
        share = (sparsity_bf16 - sparsity_fp32) / sparsity_bf16
    elif below_half_ulp is not None:
        share = below_half_ulp / sparsity_bf16
    else:
        return None
    return max(0.0, min(1.0, share))


def precision_caveat(summary: dict[str, Any], fp32_summary: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The bf16-vs-fp32 caveat text and its numbers for one analysis summary."""
    s16 = num(summary.get("sparsity"))
    s32 = num(summary.get("sparsity_fp32"))
    if s32 is None and fp32_summary is not None:
        s32 = num(fp32_summary.get("sparsity"))
    ulp = num(summary.get("below_half_ulp_fraction"))
    away = num(summary.get("rounded_away_fraction"))
    share = rounding_share(s16, s32, ulp, away)
    vals = {"sparsity_bf16": s16, "sparsity_fp32": s32, "below_half_ulp_fraction": ulp,
            "rounded_away_fraction": away, "rounding_share": share}
    if s32 is None and ulp is None:
        return "precision: no fp32 checkpoint, so the share of sparsity due to bf16 rounding is unknown", vals
    text = f"precision: bf16 {fmt(s16, True)} unchanged vs fp32 {fmt(s32, True)}"
    if ulp is not None:
        text += f"; {fmt(ulp, True)} of coordinates moved less than half a bf16 ULP"
    if share is not None:
        text += f"; {fmt(share, True)} of the bf16 sparsity is storage rounding"
    return text, vals


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _lr_sweep_note(lr_sweep: dict[str, Any] | None) -> str:
    points = sorted((p for p in (lr_sweep or {}).get("points") or [] if num(p.get("lr")) is not None),
                    key=lambda p: p["lr"])
    if len(points) < 2:
        return ""
    lo, hi = points[0], points[-1]
    return (f"; lr sweep: bf16 sparsity {fmt(num(lo.get('sparsity_bf16')), True)} at lr {fmt(lo['lr'])} vs "
            f"{fmt(num(hi.get('sparsity_bf16')), True)} at lr {fmt(hi['lr'])}")


# ----------------------------------------------------------------------------- claims 1, 2, 5, 6, 7


def claim_sparse(inp: FindingInputs) -> Finding:
    rule = (f"holds if bf16 sparsity ≥ {SPARSITY_HOLDS_MIN:.0%} and ‖Δ‖/‖W‖ ≤ {REL_UPDATE_SMALL_MAX}; "
            "does not hold "
            f"if sparsity < {SPARSITY_FAILS_BELOW:.0%} or ‖Δ‖/‖W‖ > {REL_UPDATE_LARGE_ABOVE}")
    summary = (inp.analysis or {}).get("summary") or {}
    s, r = num(summary.get("sparsity")), num(summary.get("relative_update_norm"))
    if s is None or r is None:
        return not_measured(1, "analysis.json summary.sparsity and relative_update_norm", rule)
    verdict = combine(
        _band(s, lambda v: v >= SPARSITY_HOLDS_MIN, lambda v: v < SPARSITY_FAILS_BELOW),
        _band(r, lambda v: v <= REL_UPDATE_SMALL_MAX, lambda v: v > REL_UPDATE_LARGE_ABOVE))
    s5 = num(summary.get("sparsity_atol_1e-05"))
    caveat, vals = precision_caveat(summary, (inp.analysis_fp32 or {}).get("summary"))
    sft = num(((inp.by_method.get("sft") or {}).get("summary") or {}).get("sparsity"))
    control = "dense fine-tuning changes every coordinate (sparsity 0)"
    if sft is not None:
        control += f"; SFT baseline sparsity {fmt(sft, True)}"
    if vals["sparsity_fp32"] is not None:
        control += f"; same run in fp32: {fmt(vals['sparsity_fp32'], True)}"
    return Finding(1, CLAIMS[1], verdict,
                   f"bf16 sparsity {fmt(s, True)} (|Δ| ≤ 1e-5: {fmt(s5, True)}); ‖Δ‖/‖W‖ = {fmt(r)}",
                   control, rule, _join(caveat + _lr_sweep_note(inp.lr_sweep), gguf_clause(inp.analysis)),
                   inp.analysis_name,
                   {"sparsity": s, "sparsity_atol_1e-05": s5, "relative_update_norm": r, "sft_sparsity": sft,
                    "base_exact_zero_fraction": zero_fraction(inp.analysis), **vals})


def _is_layer_index(x: Any) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, str) and x.isdigit())


def group_rows(analysis: dict[str, Any] | None, kind: str) -> list[dict[str, Any]]:
    """The rows of one group table ("layer", "module", "block") of an analysis.json; [] when absent.

    Rows are normalized copies: the group's name under `kind` (writers may call it "group") and
    its size under "numel" (or "num_params").
    """
    groups = (analysis or {}).get("groups")
    rows = groups.get(kind) if isinstance(groups, dict) else None
    out = []
    for r in rows if isinstance(rows, list) else []:
        if isinstance(r, dict):
            out.append({**r, kind: r.get(kind, r.get("group")), "numel": r.get("numel", r.get("num_params"))})
    return out


def _block_norm(rows: list[dict[str, Any]], names: set[str]) -> float | None:
    for row in rows:
        if str(row.get("block", "")).lower() in names:
            return num(row.get("relative_update_norm"))
    return None


def claim_spread(inp: FindingInputs) -> Finding:
    rule = (f"holds if the least-moved layer's ‖Δ‖/‖W‖ is ≥ {SPREAD_HOLDS_MIN} × the most-moved layer's "
            f"and MLP/attention ‖Δ‖/‖W‖ ≥ {FFN_HEAVY_MIN}; does not hold if that layer ratio < "
            f"{SPREAD_FAILS_BELOW} or MLP/attention "
            f"< {FFN_FAILS_BELOW}")
    layers = [r for r in group_rows(inp.analysis, "layer") if _is_layer_index(r.get("layer"))]
    norms = [v for v in (num(r.get("relative_update_norm")) for r in layers) if v is not None]
    blocks = group_rows(inp.analysis, "block")
    mlp = _block_norm(blocks, {"mlp", "ffn"})
    attn = _block_norm(blocks, {"attention", "attn", "self_attn"})
    if len(norms) < 2 or mlp is None or attn is None or attn <= 0:
        return not_measured(2, "analysis.json groups.layer (≥ 2 layers) and groups.block with mlp and attention rows",
                            rule)
    spread = min(norms) / max(norms) if max(norms) > 0 else 0.0
    ffn = mlp / attn
    shares = [v for v in (num(r.get("energy_share")) for r in layers) if v is not None]
    top_share = max(shares) if shares else None
    verdict = combine(_band(spread, lambda v: v >= SPREAD_HOLDS_MIN, lambda v: v < SPREAD_FAILS_BELOW),
                      _band(ffn, lambda v: v >= FFN_HEAVY_MIN, lambda v: v < FFN_FAILS_BELOW))
    return Finding(2, CLAIMS[2], verdict,
                   f"layer ‖Δ‖/‖W‖ min/max = {fmt(spread)} over {len(norms)} layers (largest layer energy share "
                   f"{fmt(top_share, True)}); MLP {fmt(mlp)} vs attention {fmt(attn)} (ratio {fmt(ffn)})",
                   f"an even spread gives min/max 1 and each layer 1/{len(norms)} = {fmt(1 / len(norms), True)} of the "
                   "energy; equal movement gives MLP/attention 1", rule, "", inp.analysis_name,
                   {"layer_spread": spread, "ffn_attention_ratio": ffn, "mlp": mlp, "attention": attn,
                    "top_layer_energy_share": top_share, "num_layers": len(norms)})


def _flat_top8_baseline(tensors: list[dict[str, Any]]) -> float | None:
    """Median over matrices of min(8, r)/r, r = min(rows, cols): the top-8 energy of a flat spectrum.

    Shapes come from tensors.csv: `rows`/`cols`, or `shape` as "AxBx…" (viewed as A × (B·…), as the
    analysis does for convolution kernels). 1-D tensors are skipped.
    """
    vals: list[float] = []
    for row in tensors:
        dims: list[float] = []
        if num(row.get("rows")) and num(row.get("cols")):
            dims = [float(row["rows"]), float(row["cols"])]
        elif isinstance(row.get("shape"), str):
            dims = [float(d) for d in re.findall(r"\d+", row["shape"])]
        if len(dims) >= 2:
            r = min(dims[0], math.prod(dims[1:]))
            if r >= 2:
                vals.append(min(8.0, r) / r)
    return statistics.median(vals) if vals else None


def claim_spectrum(inp: FindingInputs) -> Finding:
    rule = (f"holds if median rank fraction (tol 1e-5) ≥ {RANK_FULL_MIN}, median top-8 energy ≥ {TOP8_HOLDS_MIN} "
            "and ≥ "
            f"{FLAT_MULTIPLE_HOLDS}× a flat spectrum's; does not hold if rank fraction < {RANK_FAILS_BELOW}, top-8 energy "
            f"< {TOP8_FAILS_BELOW} or < {FLAT_MULTIPLE_FAILS}× flat")
    summary = (inp.analysis or {}).get("summary") or {}
    rank, top8 = num(summary.get("median_rank_fraction_tol_1e-05")), num(summary.get("median_top8_energy"))
    stable = num(summary.get("median_stable_rank"))
    if rank is None or top8 is None:
        return not_measured(5, "analysis.json summary.median_rank_fraction_tol_1e-05 and median_top8_energy", rule)
    flat = _flat_top8_baseline(inp.tensors)
    parts = [_band(rank, lambda v: v >= RANK_FULL_MIN, lambda v: v < RANK_FAILS_BELOW),
             _band(top8, lambda v: v >= TOP8_HOLDS_MIN, lambda v: v < TOP8_FAILS_BELOW)]
    control = "a flat spectrum: top-8 energy min(8, r)/r"
    caveat = ""
    if flat is not None:
        parts.append(_band(top8 / flat, lambda v: v >= FLAT_MULTIPLE_HOLDS, lambda v: v < FLAT_MULTIPLE_FAILS))
        control += f" = {fmt(flat)} (median over 2-D tensors)"
    else:
        caveat = "tensors.csv has no rows/cols or shape columns: the flat-spectrum comparison was skipped"
    return Finding(5, CLAIMS[5], combine(*parts),
                   f"median rank fraction {fmt(rank)}; median top-8 energy {fmt(top8)}; median stable rank {fmt(stable)}",
                   control, rule, caveat, inp.analysis_name,
                   {"rank_fraction": rank, "top8_energy": top8, "stable_rank": stable, "flat_top8": flat})


def principal_ratio(summary: dict[str, Any]) -> float | None:
    e, rnd = num(summary.get("principal_energy_both_rho_0.1")), num(summary.get("principal_energy_both_rho_0.1_random"))
    return e / rnd if e is not None and rnd else None


def claim_off_principal(inp: FindingInputs) -> Finding:
    rule = (f"holds if principal-subspace energy (ρ = 10 %) ≤ {PRINCIPAL_RATIO_HOLDS_MAX}× its random baseline; "
            "does not "
            f"hold if > {PRINCIPAL_RATIO_FAILS_ABOVE}×")
    summary = (inp.analysis or {}).get("summary") or {}
    ratio = principal_ratio(summary)
    if ratio is None:
        return not_measured(6, "analysis.json summary.principal_energy_both_rho_0.1 and its _random baseline", rule)
    e, rnd = num(summary.get("principal_energy_both_rho_0.1")), num(summary.get("principal_energy_both_rho_0.1_random"))
    enr = num(summary.get("principal_mask_enrichment_rho_0.1"))
    return Finding(6, CLAIMS[6],
                   _band(ratio, lambda v: v <= PRINCIPAL_RATIO_HOLDS_MAX, lambda v: v > PRINCIPAL_RATIO_FAILS_ABOVE),
                   f"E_both = {fmt(e)} ({fmt(ratio)}× random); principal-weight enrichment {fmt(enr)}",
                   f"a random update puts k²/(mn) = {fmt(rnd)} of its energy there (ratio 1)", rule, "",
                   inp.analysis_name, {"principal_energy": e, "principal_energy_random": rnd,
                                       "principal_energy_ratio": ratio, "principal_mask_enrichment": enr})


def claim_near_zero(inp: FindingInputs) -> Finding:
    rule = (f"holds if low-magnitude enrichment (ρ = 10 %) ≥ {LOW_MAG_HOLDS_MIN}; "
            f"does not hold if ≤ {LOW_MAG_FAILS_MAX}")
    summary = (inp.analysis or {}).get("summary") or {}
    enr = num(summary.get("low_magnitude_enrichment_rho_0.1"))
    if enr is None:
        return not_measured(7, "analysis.json summary.low_magnitude_enrichment_rho_0.1", rule)
    fp32 = num(summary.get("low_magnitude_enrichment_rho_0.1_fp32"))
    if fp32 is None:
        fp32 = num(((inp.analysis_fp32 or {}).get("summary") or {}).get("low_magnitude_enrichment_rho_0.1"))
    caveat, vals = precision_caveat(summary, (inp.analysis_fp32 or {}).get("summary"))
    caveat = ("bf16 rounds away changes below half a ULP (≈ |w|·2⁻⁹), so small weights keep changes large ones "
              f"lose; fp32 enrichment {fmt(fp32)}; " + caveat)
    return Finding(7, CLAIMS[7], _band(enr, lambda v: v >= LOW_MAG_HOLDS_MIN, lambda v: v <= LOW_MAG_FAILS_MAX),
                   f"bf16 low-magnitude enrichment {fmt(enr)} (fp32: {fmt(fp32)})",
                   "chance: enrichment 1 (updates land on the smallest 10 % of |W| as often as anywhere)",
                   rule, _join(caveat, gguf_clause(inp.analysis)), inp.analysis_name,
                   {"low_magnitude_enrichment": enr, "low_magnitude_enrichment_fp32": fp32,
                    "base_exact_zero_fraction": zero_fraction(inp.analysis), **vals})


# ----------------------------------------------------------------------------- claims 3, 4 (experiments)


def _pick_metric(entries: list[dict[str, Any]]) -> str | None:
    """'accuracy' when every entry has it, else 'reverse_kl' when every entry has that, else None."""
    for key in ("accuracy", "reverse_kl"):
        if entries and all(num(e.get(key)) is not None for e in entries):
            return key
    return None


ARMS = ("full", "subnetwork", "random", "lora")  # subnetwork.json "runs" keys, in display order


def subnetwork_arms(sub: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """subnetwork.json "runs" as {arm: row}, known arms first (full, subnetwork, random, lora)."""
    raw = sub.get("runs")
    runs = {str(k): v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}
    return {k: runs[k] for k in sorted(runs, key=lambda k: (ARMS.index(k) if k in ARMS else len(ARMS), k))}


def closeness(row: dict[str, Any]) -> tuple[float | None, float | None]:
    """(fraction of weights equal to the full run's within 1e-5, ‖W − W_full‖/‖W_full − W_source‖) of an arm."""
    close = row.get("close_to_full") or {}
    return num(close.get("frac_equal_1e-5")), num(close.get("relative_distance"))


def second_moment_by_method(opt: dict[str, Any]) -> dict[str, float | None]:
    """optimizers.json "second_moment_cv" as {method: median over tensors of the CV of √v}."""
    raw = opt.get("second_moment_cv")
    items = raw.items() if isinstance(raw, dict) else []
    return {str(m): num(v.get("median_cv")) for m, v in items if isinstance(v, dict)}


def _has_gain(metric: str, source: float, full: float) -> bool:
    if metric == "accuracy":
        return full - source >= MIN_GAIN_ACCURACY
    return source - full >= MIN_GAIN_KL_FRACTION * source


def claim_subnetwork(inp: FindingInputs) -> Finding:
    rule = (f"recovery = (masked − source)/(full − source) on accuracy (else eval reverse KL); holds if the OPD mask "
            f"recovers ≥ {RECOVERY_HOLDS_MIN:.0%}, the random mask ≥ {RANDOM_GAP_MIN:.0%} less and the accuracy gap "
            f"exceeds {Z_NOISE:g} standard errors; does not hold if the OPD mask recovers < {RECOVERY_FAILS_BELOW:.0%} "
            f"or the random mask ≥ {RECOVERY_HOLDS_MIN:.0%} (or more than the OPD mask)")
    sub = inp.subnetwork or {}
    arms = subnetwork_arms(sub)
    source, full, opd = sub.get("source") or {}, arms.get("full"), arms.get("subnetwork")
    if not source or full is None or opd is None:
        return not_measured(3, "subnetwork.json with source and 'full' and 'subnetwork' runs", rule)
    rand = arms.get("random")
    metric = _pick_metric([source, full, opd] + ([rand] if rand else []))
    if metric is None:
        return not_measured(3, "accuracy or reverse_kl for source, full and masked runs in subnetwork.json", rule)
    src, fv, ov = (float(x[metric]) for x in (source, full, opd))
    rv = num(rand.get(metric)) if rand else None
    vals: dict[str, Any] = {"metric": metric, "source": src, "full": fv, "opd_mask": ov, "random_mask": rv,
                            "opd_density": num(opd.get("trainable_fraction"))}
    lora = arms.get("lora")
    measured = f"{metric}: source {fmt(src)}, full OPD {fmt(fv)}, OPD mask {fmt(ov)}"
    measured += f", random mask {fmt(rv)}" if rand else ""
    measured += f", LoRA {fmt(num(lora.get(metric)))}" if lora else ""
    equal, distance = closeness(opd)
    if equal is not None or distance is not None:
        measured += (f"; OPD-mask weights equal to full run's (±1e-5): {fmt(equal, True)}, "
                     f"relative distance {fmt(distance)}")
    control = (f"random mask of matched density ({fmt(num((rand or {}).get('trainable_fraction')), True)} trainable)"
               if rand else "random mask: missing")
    if not _has_gain(metric, src, fv):
        return Finding(3, CLAIMS[3], INCONCLUSIVE, measured, control, rule,
                       "the full run barely improved on the source: nothing to recover", "subnetwork.json", vals)
    rec_opd = (ov - src) / (fv - src)
    rec_rand = (rv - src) / (fv - src) if rv is not None else None
    vals.update(recovery_opd=rec_opd, recovery_random=rec_rand)
    measured += f"; recovery OPD mask {fmt(rec_opd, True)}, random {fmt(rec_rand, True)}"
    caveat = ""
    if rec_opd < RECOVERY_FAILS_BELOW or (rec_rand is not None and
                                          (rec_rand >= RECOVERY_HOLDS_MIN or rec_rand >= rec_opd)):
        verdict = FAILS
    elif rec_rand is None:
        verdict, caveat = INCONCLUSIVE, "no random-mask control in subnetwork.json"
    elif rec_opd >= RECOVERY_HOLDS_MIN and rec_opd - rec_rand >= RANDOM_GAP_MIN:
        verdict = HOLDS
        if metric == "accuracy" and rv is not None and gap_is_noise(ov, rv, num(sub.get("num_eval"))):
            verdict, caveat = INCONCLUSIVE, f"OPD-mask vs random-mask gap is within {Z_NOISE:g} standard errors"
    else:
        verdict = INCONCLUSIVE
    return Finding(3, CLAIMS[3], verdict, measured, control, rule, caveat, "subnetwork.json", vals)


def best_per_optimizer(sweep: list[dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    """The best sweep row per optimizer (highest accuracy, or lowest reverse KL)."""
    sign = 1.0 if metric == "accuracy" else -1.0
    best: dict[str, dict[str, Any]] = {}
    for row in sweep:
        opt, v = str(row.get("optimizer")), num(row.get(metric))
        if v is not None and (opt not in best or sign * v > sign * float(best[opt][metric])):
            best[opt] = row
    return best


def at_grid_edge(sweep: list[dict[str, Any]], optimizer: str, lr: float) -> bool:
    """True when `lr` is the smallest or largest lr tried for `optimizer` (the optimum may lie outside)."""
    lrs = sorted({float(r["lr"]) for r in sweep if r.get("optimizer") == optimizer and num(r.get("lr")) is not None})
    return len(lrs) < 3 or lr in (lrs[0], lrs[-1])


def claim_optimizers(inp: FindingInputs) -> Finding:
    rule = (f"compare each optimizer's best lr; holds if AdamW beats the best SGD variant by ≥ {ADAMW_MARGIN_ACCURACY} "
            f"accuracy (or ≥ {ADAMW_MARGIN_KL_FRACTION:.0%} lower reverse KL), beyond {Z_NOISE:g} standard errors, with "
            "each SGD variant's best lr inside its grid (≥ 3 lrs); does not hold if an SGD variant is as good or better")
    opt = inp.optimizers or {}
    sweep = [r for r in opt.get("sweep") or [] if isinstance(r, dict)]
    metric = _pick_metric(sweep)
    best = best_per_optimizer(sweep, metric) if metric else {}
    sgd_names = sorted(k for k in best if k != "adamw")
    if "adamw" not in best or not sgd_names or metric is None:
        return not_measured(4, "optimizers.json sweep rows for adamw and sgd/sgd_momentum with accuracy or reverse_kl",
                            rule)
    a = float(best["adamw"][metric])
    top = max(sgd_names, key=lambda k: float(best[k][metric]) * (1 if metric == "accuracy" else -1))
    s = float(best[top][metric])
    margin = a - s if metric == "accuracy" else (s - a) / s if s else 0.0
    need = ADAMW_MARGIN_ACCURACY if metric == "accuracy" else ADAMW_MARGIN_KL_FRACTION
    parts = [f"{k} {fmt(float(best[k][metric]))} (lr {fmt(num(best[k].get('lr')))})" for k in ["adamw"] + sgd_names]
    measured = f"best {metric}: " + ", ".join(parts)
    cv = second_moment_by_method(opt)
    if cv:
        measured += "; median CV of √v within tensors: " + ", ".join(f"{m} {fmt(v)}" for m, v in cv.items())
    vals: dict[str, Any] = {"metric": metric, "adamw": a, "best_sgd": s, "best_sgd_name": top, "margin": margin,
                            "second_moment_cv": cv}
    caveat = ""
    if margin <= 0:
        verdict = FAILS
    elif margin < need:
        verdict = INCONCLUSIVE
    elif metric == "accuracy" and gap_is_noise(a, s, num(opt.get("num_eval"))):
        verdict, caveat = INCONCLUSIVE, f"the gap is within {Z_NOISE:g} standard errors"
    else:
        edges = [k for k in sgd_names if at_grid_edge(sweep, k, float(best[k]["lr"]))]
        verdict = INCONCLUSIVE if edges else HOLDS
        if edges:
            caveat = f"best lr of {', '.join(edges)} is at the edge of its grid (or < 3 lrs tried): widen the sweep"
    return Finding(4, CLAIMS[4], verdict, measured, f"SGD at its own best lr ({top})", rule, caveat,
                   "optimizers.json", vals)


# ----------------------------------------------------------------------------- claim 8 and the table


def signatures(summary: dict[str, Any]) -> dict[str, float | None]:
    """The parameter signatures compared across methods, on the scale they are compared (log for ratios)."""
    def log(x: float | None) -> float | None:
        return math.log(x) if x is not None and x > 0 else None
    return {"sparsity": num(summary.get("sparsity")),
            "relative_update_norm": log(num(summary.get("relative_update_norm"))),
            "principal_energy_ratio": log(principal_ratio(summary)),
            "low_magnitude_enrichment": log(num(summary.get("low_magnitude_enrichment_rho_0.1")))}


def claim_on_policy(inp: FindingInputs) -> Finding:
    rule = (f"on each signature where SFT and RL differ (sparsity by ≥ {SIGNATURE_SEPARATION['sparsity']}, ratios by "
            f"≥ 1.5× (enrichment 1.1×)), OPD is closer to RL or to SFT; holds if closer to RL on ≥ 2/3 of ≥ "
            f"{SIGNATURES_MIN} such signatures, does not hold if on ≤ 1/3")
    sums = {m: (a.get("summary") or {}) for m, a in inp.by_method.items()}
    if "opd" not in sums or not ({"sft", "rl"} & set(sums)):
        return not_measured(8, "bf16 analyses of the OPD run and of the SFT and RL baselines", rule)
    sig = {m: signatures(s) for m, s in sums.items()}
    shown = {"sparsity": "sparsity", "relative_update_norm": "‖Δ‖/‖W‖",
             "principal_energy_ratio": "principal energy / random", "low_magnitude_enrichment": "low-mag enrichment"}
    def raw(m: str, k: str) -> str:
        v = sig.get(m, {}).get(k)
        return "n/a" if v is None else fmt(v, True) if k == "sparsity" else fmt(math.exp(v))
    def shown_as(m: str) -> str:
        return inp.method_labels.get(m, m)
    measured = "; ".join(f"{label}: " + " / ".join(f"{shown_as(m)} {raw(m, k)}" for m in ("opd", "sft", "rl")
                                                   if m in sig)
                         for k, label in shown.items())
    vals: dict[str, Any] = {"signatures": sig, "closer_to_rl": {}}
    if not {"sft", "rl"} <= set(sums):
        return Finding(8, CLAIMS[8], INCONCLUSIVE, measured, "SFT and RL baselines (one is missing)", rule,
                       "needs both the SFT and the RL baseline", "analyses by method", vals)
    votes: dict[str, bool] = {}
    for k, sep in SIGNATURE_SEPARATION.items():
        o, s, r = sig["opd"][k], sig["sft"][k], sig["rl"][k]
        if o is None or s is None or r is None or abs(s - r) < sep:
            continue  # missing, or SFT and RL too alike for this signature to tell them apart
        votes[k] = abs(o - r) < abs(o - s)
    vals["closer_to_rl"] = votes
    n, k_rl = len(votes), sum(votes.values())
    if n < SIGNATURES_MIN:
        verdict, caveat = INCONCLUSIVE, f"only {n} signature(s) separate SFT from RL"
    else:
        verdict = HOLDS if k_rl >= SIGNATURE_HOLDS_SHARE * n - 1e-9 else (
            FAILS if k_rl <= SIGNATURE_FAILS_SHARE * n + 1e-9 else INCONCLUSIVE)
        caveat = f"OPD closer to RL on {k_rl} of {n} separating signatures ({', '.join(votes)})"
    return Finding(8, CLAIMS[8], verdict, measured, "SFT (off-policy) and RL (on-policy) baselines from the same source",
                   rule, caveat, "analyses by method", vals)


def build_findings(inp: FindingInputs) -> list[Finding]:
    """All eight rows, in the study's order."""
    return [claim_sparse(inp), claim_spread(inp), claim_subnetwork(inp), claim_optimizers(inp),
            claim_spectrum(inp), claim_off_principal(inp), claim_near_zero(inp), claim_on_policy(inp)]


def format_table(rows: list[Finding], width: int = 100) -> str:
    """A plain-text findings table for the terminal: number, verdict, claim, measured value."""
    lines = [f"{'#':<2} {'verdict':<14} claim / measured", "-" * width]
    for r in rows:
        lines.append(f"{r.number:<2} {r.verdict:<14} {r.claim}"[:width])
        if r.verdict != NOT_MEASURED:
            lines.append(f"{'':<17} {r.measured}"[:width])
    return "\n".join(lines)
