"""Verdict rules shared by every claim: thresholds, the row and input types, and small helpers.

Every threshold of the findings table is a named constant here and is explained in
docs/findings.md. `findings.py` (claims 1, 2, 5-8 and the table) and
`claims_experiments.py` (claims 3 and 4) build their rows from these parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

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
GAIN_Z = 3.0                    # (3, 4) accuracy decides when the trained run's gain over the source exceeds
                                # GAIN_Z standard errors; else the reverse KL (with its standard error) decides
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
    # the study's reported number beside each figure opdlab measured (report/study_column.py)
    study: list[dict[str, Any]] = field(default_factory=list)


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


def band(value: float, holds: Callable[[float], bool], fails: Callable[[float], bool]) -> str:
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


def row_se(row: dict[str, Any], metric: str, n: float | None, suffix: str = "") -> float | None:
    """Standard error of `metric` in an experiment row: binomial for accuracy (n known), else the
    row's own `<metric>_se<suffix>` (reverse_kl_se, reverse_kl_se_start, ...)."""
    if metric == "accuracy":
        p = num(row.get("accuracy" + suffix))
        return binomial_se(p, n) if p is not None and n else None
    return num(row.get(f"{metric}_se{suffix}"))


def diff_se(se_a: float | None, se_b: float | None) -> float | None:
    """Standard error of a difference of two independent estimates (None if either is unknown)."""
    return None if se_a is None or se_b is None else math.sqrt(se_a ** 2 + se_b ** 2)


def _linearized(ex: dict[str, Any], metric: str) -> list[float] | None:
    """Per-prompt linearization of a row's mean (its influence values): for the per-token reverse KL
    (a ratio Σs/Σc) z_i = (s_i − R c_i) / c̄, for accuracy and answer log-likelihood z_i = v_i − mean."""
    if metric == "reverse_kl":
        sums, counts = ex.get("reverse_kl_sum"), ex.get("reverse_kl_tokens")
        if not isinstance(sums, list) or not isinstance(counts, list) or len(sums) != len(counts) or not sums:
            return None
        total = float(sum(counts))
        if total <= 0:
            return None
        ratio, mean_count = float(sum(sums)) / total, total / len(sums)
        return [(float(a) - ratio * float(c)) / mean_count for a, c in zip(sums, counts)]
    values = ex.get("correct" if metric == "accuracy" else metric)
    if not isinstance(values, list) or not values:
        return None
    mean = sum(float(v) for v in values) / len(values)
    return [float(v) - mean for v in values]


def paired_se(a: dict[str, Any], b: dict[str, Any], metric: str, a_suffix: str = "", b_suffix: str = "") -> float | None:
    """Standard error of (a − b) on `metric` from the per-prompt values of two evaluations on the same
    held-out prompts (rows' `per_example<suffix>`, evals/step-N.json), pairing prompt i with prompt i:
    √(Σ (z_a,i − z_b,i)² / (m (m − 1))) with z the linearized values (`_linearized`). Pairing removes
    what the prompts share — how hard each one is — which dominates both means' own errors. None when
    either row lacks per-prompt values or they cover different numbers of prompts."""
    ea, eb = a.get("per_example" + a_suffix), b.get("per_example" + b_suffix)
    if not isinstance(ea, dict) or not isinstance(eb, dict):
        return None
    za, zb = _linearized(ea, metric), _linearized(eb, metric)
    if za is None or zb is None or len(za) != len(zb) or len(za) < 2:
        return None
    m = len(za)
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(za, zb)) / (m * (m - 1)))


def difference_se(a: dict[str, Any], b: dict[str, Any], metric: str, n: float | None,
                  a_suffix: str = "", b_suffix: str = "") -> float | None:
    """Standard error of (a − b) on `metric`: paired when both rows carry per-prompt values, else from the
    two rows' own errors as if independent (binomial for accuracy with `n` known)."""
    paired = paired_se(a, b, metric, a_suffix, b_suffix)
    if paired is not None:
        return paired
    return diff_se(row_se(a, metric, n, a_suffix), row_se(b, metric, n, b_suffix))


@dataclass
class MetricChoice:
    """Which held-out metric decides claim 3 or 4, why, and whether the trained run gained on it."""

    metric: str | None          # "accuracy", "reverse_kl", or None (decide the legacy way)
    reason: str = ""
    gain: float | None = None   # improvement over the source (accuracy up, KL down)
    gain_se: float | None = None

    @property
    def gained(self) -> bool | None:
        """True when the gain exceeds GAIN_Z standard errors (None when the errors are unknown)."""
        if self.gain is None or self.gain_se is None:
            return None
        return self.gain > GAIN_Z * self.gain_se


def choose_metric(source: dict[str, Any], trained: dict[str, Any], n: float | None,
                  source_suffix: str = "") -> MetricChoice:
    """Accuracy when `trained` beats `source` on it by more than GAIN_Z standard errors; else the
    reverse KL when both rows carry its standard error; else MetricChoice(None) (files written
    before the errors were logged: the caller keeps its earlier rule). `source_suffix` "_start"
    reads the source's values from a run's step-0 columns."""
    acc_s, acc_t = num(source.get("accuracy" + source_suffix)), num(trained.get("accuracy"))
    acc_gain = acc_se = None
    if acc_s is not None and acc_t is not None and n:
        acc_gain, acc_se = acc_t - acc_s, difference_se(trained, source, "accuracy", n, "", source_suffix)
        if acc_gain > GAIN_Z * acc_se:
            return MetricChoice("accuracy", f"accuracy decided: its gain over the source {fmt(acc_gain)} exceeds "
                                f"{GAIN_Z:g} standard errors ({fmt(GAIN_Z * acc_se)})", acc_gain, acc_se)
    kl_s, kl_t = num(source.get("reverse_kl" + source_suffix)), num(trained.get("reverse_kl"))
    kl_se = difference_se(trained, source, "reverse_kl", n, "", source_suffix)
    if kl_s is None or kl_t is None or kl_se is None:
        return MetricChoice(None)
    why = ("no accuracy" if acc_gain is None else
           f"accuracy gain {fmt(acc_gain)} is within {GAIN_Z:g} standard errors ({fmt(GAIN_Z * acc_se)})")
    return MetricChoice("reverse_kl", f"reverse KL decided ({why}); its drop {fmt(kl_s - kl_t)} vs "
                        f"{GAIN_Z:g} standard errors {fmt(GAIN_Z * kl_se)}", kl_s - kl_t, kl_se)


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


def join_parts(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def lr_sweep_note(lr_sweep: dict[str, Any] | None) -> str:
    points = sorted((p for p in (lr_sweep or {}).get("points") or [] if num(p.get("lr")) is not None),
                    key=lambda p: p["lr"])
    if len(points) < 2:
        return ""
    lo, hi = points[0], points[-1]
    return (f"; lr sweep: bf16 sparsity {fmt(num(lo.get('sparsity_bf16')), True)} at lr {fmt(lo['lr'])} vs "
            f"{fmt(num(hi.get('sparsity_bf16')), True)} at lr {fmt(hi['lr'])}")
