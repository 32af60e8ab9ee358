"""Claims 3 and 4, decided from the experiment files: subnetwork retraining and AdamW vs SGD.

    finding = claim_subnetwork(FindingInputs(subnetwork=json.load(open("subnetwork.json"))))
"""

from __future__ import annotations

from typing import Any

from opdlab.report.verdicts import (
    ADAMW_MARGIN_ACCURACY, ADAMW_MARGIN_KL_FRACTION, CLAIMS, FAILS, HOLDS, INCONCLUSIVE, MIN_GAIN_ACCURACY,
    MIN_GAIN_KL_FRACTION, RANDOM_GAP_MIN, RECOVERY_FAILS_BELOW, RECOVERY_HOLDS_MIN, Z_NOISE, Finding, FindingInputs,
    fmt, gap_is_noise, not_measured, num,
)

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
