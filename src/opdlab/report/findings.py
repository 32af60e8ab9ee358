"""The findings table: one row per claim of the study, decided by explicit rules on loaded data.

Pure functions from already-loaded dicts (analysis.json, subnetwork.json, ...) to
`Finding` rows; no file access, no weights. Every threshold is a named constant in
`verdicts.py` and is explained in docs/findings.md; claims 3 and 4 (the experiments) are
decided in `claims_experiments.py`. Verdicts are "holds", "does not hold",
"inconclusive" (between the hold and fail thresholds, or too noisy), and "not measured"
(the inputs are absent).

    rows = build_findings(FindingInputs(analysis=json.load(open("analysis.json"))))
    print(format_table(rows))
"""
from __future__ import annotations

import math
import re
import statistics
from typing import Any

from opdlab.report.claims_experiments import claim_optimizers, claim_subnetwork
from opdlab.report.source_format import gguf_clause, zero_fraction
from opdlab.report.study_column import add_study_column
from opdlab.report.verdicts import (  # noqa: F401  (HOLDS ... NOT_MEASURED, FindingInputs: the findings API)
    CLAIMS, FAILS, FFN_FAILS_BELOW, FFN_HEAVY_MIN, FLAT_MULTIPLE_FAILS, FLAT_MULTIPLE_HOLDS, HOLDS, INCONCLUSIVE,
    LOW_MAG_FAILS_MAX, LOW_MAG_HOLDS_MIN, NOT_MEASURED, PRINCIPAL_RATIO_FAILS_ABOVE, PRINCIPAL_RATIO_HOLDS_MAX,
    RANK_FAILS_BELOW, RANK_FULL_MIN, REL_UPDATE_LARGE_ABOVE, REL_UPDATE_SMALL_MAX, SIGNATURE_FAILS_SHARE,
    SIGNATURE_HOLDS_SHARE, SIGNATURE_SEPARATION, SIGNATURES_MIN, SPARSITY_FAILS_BELOW, SPARSITY_HOLDS_MIN,
    SPREAD_FAILS_BELOW, SPREAD_HOLDS_MIN, TOP8_FAILS_BELOW, TOP8_HOLDS_MIN, Finding, FindingInputs, band, combine,
    fmt, join_parts, lr_sweep_note, not_measured, num, precision_caveat,
)

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
        band(s, lambda v: v >= SPARSITY_HOLDS_MIN, lambda v: v < SPARSITY_FAILS_BELOW),
        band(r, lambda v: v <= REL_UPDATE_SMALL_MAX, lambda v: v > REL_UPDATE_LARGE_ABOVE))
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
                   control, rule, join_parts(caveat + lr_sweep_note(inp.lr_sweep), gguf_clause(inp.analysis)),
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
    verdict = combine(band(spread, lambda v: v >= SPREAD_HOLDS_MIN, lambda v: v < SPREAD_FAILS_BELOW),
                      band(ffn, lambda v: v >= FFN_HEAVY_MIN, lambda v: v < FFN_FAILS_BELOW))
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
    parts = [band(rank, lambda v: v >= RANK_FULL_MIN, lambda v: v < RANK_FAILS_BELOW),
             band(top8, lambda v: v >= TOP8_HOLDS_MIN, lambda v: v < TOP8_FAILS_BELOW)]
    control = "a flat spectrum: top-8 energy min(8, r)/r"
    caveat = ""
    if flat is not None:
        parts.append(band(top8 / flat, lambda v: v >= FLAT_MULTIPLE_HOLDS, lambda v: v < FLAT_MULTIPLE_FAILS))
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
                   band(ratio, lambda v: v <= PRINCIPAL_RATIO_HOLDS_MAX, lambda v: v > PRINCIPAL_RATIO_FAILS_ABOVE),
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
    return Finding(7, CLAIMS[7], band(enr, lambda v: v >= LOW_MAG_HOLDS_MIN, lambda v: v <= LOW_MAG_FAILS_MAX),
                   f"bf16 low-magnitude enrichment {fmt(enr)} (fp32: {fmt(fp32)})",
                   "chance: enrichment 1 (updates land on the smallest 10 % of |W| as often as anywhere)",
                   rule, join_parts(caveat, gguf_clause(inp.analysis)), inp.analysis_name,
                   {"low_magnitude_enrichment": enr, "low_magnitude_enrichment_fp32": fp32,
                    "base_exact_zero_fraction": zero_fraction(inp.analysis), **vals})


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
    """All eight rows, in the study's order, each with the study's reported numbers beside opdlab's."""
    return add_study_column([claim_sparse(inp), claim_spread(inp), claim_subnetwork(inp), claim_optimizers(inp),
                             claim_spectrum(inp), claim_off_principal(inp), claim_near_zero(inp),
                             claim_on_policy(inp)], inp)


def format_table(rows: list[Finding], width: int = 100) -> str:
    """A plain-text findings table for the terminal: number, verdict, claim, measured value."""
    lines = [f"{'#':<2} {'verdict':<14} claim / measured", "-" * width]
    for r in rows:
        lines.append(f"{r.number:<2} {r.verdict:<14} {r.claim}"[:width])
        if r.verdict != NOT_MEASURED:
            lines.append(f"{'':<17} {r.measured}"[:width])
    return "\n".join(lines)
