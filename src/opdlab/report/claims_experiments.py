"""Claims 3 and 4, decided from the experiment files: subnetwork retraining and AdamW vs SGD.

    finding = claim_subnetwork(FindingInputs(subnetwork=json.load(open("subnetwork.json"))))
"""

from __future__ import annotations

from typing import Any

from opdlab.report.verdicts import (
    ADAMW_MARGIN_ACCURACY, ADAMW_MARGIN_KL_FRACTION, CLAIMS, FAILS, GAIN_Z, HOLDS, INCONCLUSIVE, MIN_GAIN_ACCURACY,
    MIN_GAIN_KL_FRACTION, RANDOM_GAP_MIN, RECOVERY_FAILS_BELOW, RECOVERY_HOLDS_MIN, Z_NOISE, Finding, FindingInputs,
    MetricChoice, choose_metric, difference_se, fmt, gap_is_noise, join_parts, not_measured, num, paired_se,
)


def _pick_metric(entries: list[dict[str, Any]]) -> str | None:
    """'accuracy' when every entry has it, else 'reverse_kl' when every entry has that, else None."""
    for key in ("accuracy", "reverse_kl"):
        if entries and all(num(e.get(key)) is not None for e in entries):
            return key
    return None


# subnetwork.json "runs" keys, in display order: top_update is the fp32 largest-update mask at the
# subnetwork mask's per-tensor density (the magnitude control), random the density-matched random mask
ARMS = ("full", "subnetwork", "top_update", "random", "lora")


def subnetwork_arms(sub: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """subnetwork.json "runs" as {arm: row}, known arms first (full, subnetwork, top_update, random, lora)."""
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


def _within_noise(a: dict[str, Any], b: dict[str, Any], metric: str, n: float | None) -> bool:
    """True when two arms' final values of `metric` differ by at most Z_NOISE standard errors."""
    va, vb = num(a.get(metric)), num(b.get(metric))
    if va is None or vb is None:
        return False
    if metric == "accuracy" and paired_se(a, b, metric) is None:
        return gap_is_noise(va, vb, n)
    se = difference_se(a, b, metric, n)
    return se is not None and abs(va - vb) <= Z_NOISE * se


def _no_gain(choice: MetricChoice, metric: str, src: float, full: float) -> bool:
    """The full run did not improve on the source: beyond GAIN_Z standard errors when they are known,
    else by the fixed MIN_GAIN thresholds."""
    return not choice.gained if choice.gained is not None else not _has_gain(metric, src, full)


def _top_update_note(opd: dict[str, Any], top: dict[str, Any] | None, metric: str, n: float | None,
                     rec_opd: float, rec_top: float | None) -> str:
    """What the fp32 largest-update mask of the same density says about the bf16 mask."""
    if top is None or rec_top is None:
        return ""
    if _within_noise(opd, top, metric, n):
        return (f"the fp32 largest-update mask of the same density recovers {fmt(rec_top, True)}, within noise of "
                "the bf16 mask: the bf16 mask carries nothing measurable beyond update size")
    more = "more" if rec_opd > rec_top else "less"
    return (f"the fp32 largest-update mask of the same density recovers {fmt(rec_top, True)}; the bf16 mask "
            f"recovers {more} than update size alone explains")


def claim_subnetwork(inp: FindingInputs) -> Finding:
    rule = (f"recovery = (masked − source)/(full − source) on accuracy when the full run's accuracy gain exceeds "
            f"{GAIN_Z:g} standard errors, else on eval reverse KL; holds if the OPD mask "
            f"recovers ≥ {RECOVERY_HOLDS_MIN:.0%}, the random mask ≥ {RANDOM_GAP_MIN:.0%} less and their gap "
            f"exceeds {Z_NOISE:g} standard errors; does not hold if the OPD mask recovers < {RECOVERY_FAILS_BELOW:.0%} "
            f"or the random mask ≥ {RECOVERY_HOLDS_MIN:.0%} (or more than the OPD mask); inconclusive when the full "
            "run's gain is within noise")
    sub = inp.subnetwork or {}
    arms = subnetwork_arms(sub)
    source, full, opd = sub.get("source") or {}, arms.get("full"), arms.get("subnetwork")
    if not source or full is None or opd is None:
        return not_measured(3, "subnetwork.json with source and 'full' and 'subnetwork' runs", rule)
    rand, top = arms.get("random"), arms.get("top_update")
    n = num(sub.get("num_eval"))
    choice = choose_metric(source, full, n)
    metric = choice.metric or _pick_metric([source, full, opd] + ([rand] if rand else []))
    if metric is None or any(num(x.get(metric)) is None for x in (source, full, opd)):
        return not_measured(3, "accuracy or reverse_kl for source, full and masked runs in subnetwork.json", rule)
    src, fv, ov = (float(x[metric]) for x in (source, full, opd))
    rv = num(rand.get(metric)) if rand else None
    tv = num(top.get(metric)) if top else None
    vals: dict[str, Any] = {"metric": metric, "metric_reason": choice.reason, "source": src, "full": fv,
                            "opd_mask": ov, "random_mask": rv, "top_update_mask": tv,
                            "opd_density": num(opd.get("trainable_fraction")), "gain": choice.gain,
                            "gain_se": choice.gain_se}
    lora = arms.get("lora")
    measured = f"{metric}: source {fmt(src)}, full OPD {fmt(fv)}, OPD mask {fmt(ov)}"
    measured += f", fp32 top-update mask {fmt(tv)}" if top else ""
    measured += f", random mask {fmt(rv)}" if rand else ""
    measured += f", LoRA {fmt(num(lora.get(metric)))}" if lora else ""
    equal, distance = closeness(opd)
    if equal is not None or distance is not None:
        measured += (f"; OPD-mask weights equal to full run's (±1e-5): {fmt(equal, True)}, "
                     f"relative distance {fmt(distance)}")
    control = (f"random mask of matched density ({fmt(num((rand or {}).get('trainable_fraction')), True)} trainable)"
               if rand else "random mask: missing")
    if _no_gain(choice, metric, src, fv):
        return Finding(3, CLAIMS[3], INCONCLUSIVE, measured, control, rule,
                       join_parts("the full run barely improved on the source: nothing to recover", choice.reason),
                       "subnetwork.json", vals)
    rec_opd = (ov - src) / (fv - src)
    rec_rand = (rv - src) / (fv - src) if rv is not None else None
    rec_top = (tv - src) / (fv - src) if tv is not None else None
    vals.update(recovery_opd=rec_opd, recovery_random=rec_rand, recovery_top_update=rec_top)
    measured += f"; recovery OPD mask {fmt(rec_opd, True)}, random {fmt(rec_rand, True)}"
    measured += f", fp32 top-update {fmt(rec_top, True)}" if top else ""
    caveat = ""
    if rec_opd < RECOVERY_FAILS_BELOW or (rec_rand is not None and
                                          (rec_rand >= RECOVERY_HOLDS_MIN or rec_rand >= rec_opd)):
        verdict = FAILS
    elif rec_rand is None:
        verdict, caveat = INCONCLUSIVE, "no random-mask control in subnetwork.json"
    elif rec_opd >= RECOVERY_HOLDS_MIN and rec_opd - rec_rand >= RANDOM_GAP_MIN:
        verdict = HOLDS
        if rand is not None and _within_noise(opd, rand, metric, n):
            verdict, caveat = INCONCLUSIVE, f"OPD-mask vs random-mask gap is within {Z_NOISE:g} standard errors"
    else:
        verdict = INCONCLUSIVE
    caveat = join_parts(caveat, choice.reason, _top_update_note(opd, top, metric, n, rec_opd, rec_top))
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
            "each SGD variant's best lr inside its grid (≥ 3 lrs); does not hold if an SGD variant is as good or better; "
            f"accuracy decides when AdamW's gain over the source exceeds {GAIN_Z:g} standard errors, else reverse KL")
    opt = inp.optimizers or {}
    sweep = [r for r in opt.get("sweep") or [] if isinstance(r, dict)]
    n = num(opt.get("num_eval"))
    # Which metric decides: accuracy when AdamW's best run gains more than GAIN_Z standard errors over the
    # source (the step-0 columns of its rows), else the reverse KL; the legacy rule without standard errors.
    adamw_rows = [r for r in sweep if r.get("optimizer") == "adamw"]
    choice = MetricChoice(None)
    if adamw_rows:
        by_acc = best_per_optimizer(adamw_rows, "accuracy").get("adamw")
        choice = choose_metric(by_acc or adamw_rows[0], by_acc or adamw_rows[0], n, "_start")
        if choice.metric == "reverse_kl":
            by_kl = best_per_optimizer(adamw_rows, "reverse_kl").get("adamw") or adamw_rows[0]
            choice = choose_metric(by_kl, by_kl, n, "_start")
    metric = choice.metric or _pick_metric(sweep)
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
    edges = {k: at_grid_edge(sweep, k, float(best[k]["lr"])) for k in ["adamw"] + sgd_names}
    measured += "; best lr at a grid edge: " + (", ".join(k for k, e in edges.items() if e) or "none")
    vals: dict[str, Any] = {"metric": metric, "metric_reason": choice.reason, "adamw": a, "best_sgd": s,
                            "best_sgd_name": top, "margin": margin, "second_moment_cv": cv,
                            "best_lr": {k: num(best[k].get("lr")) for k in best}, "best_lr_at_edge": edges,
                            "gain": choice.gain, "gain_se": choice.gain_se}
    caveat = ""
    sgd_edges = [k for k in sgd_names if edges[k]]
    if choice.gained is False:
        verdict, caveat = INCONCLUSIVE, "AdamW's best run did not beat the source beyond noise"
    elif margin <= 0:
        verdict = FAILS
    elif margin < need:
        verdict = INCONCLUSIVE
    elif _within_noise(best["adamw"], best[top], metric, n):
        verdict, caveat = INCONCLUSIVE, f"the gap is within {Z_NOISE:g} standard errors"
    else:
        verdict = INCONCLUSIVE if sgd_edges else HOLDS
        if sgd_edges:
            caveat = f"best lr of {', '.join(sgd_edges)} is at the edge of its grid (or < 3 lrs tried): widen the sweep"
    caveat = join_parts(caveat, choice.reason)
    return Finding(4, CLAIMS[4], verdict, measured, f"SGD at its own best lr ({top})", rule, caveat,
                   "optimizers.json", vals)


# ----------------------------------------------------------------------------- early subnetwork discovery

# mask_discovery.json "arms" in display order: early snapshots (step-K, by K), the source-only mask, the final
# mask and the random control
def discovery_arms(md: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    raw = md.get("arms")
    arms = {str(k): v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}

    def order(name: str) -> tuple[int, float]:
        if name.startswith("step-") and name[5:].isdigit():
            return 0, float(name[5:])
        return {"source": (1, 0.0), "final": (2, 0.0), "random": (3, 0.0)}.get(name, (4, 0.0))

    return [(k, arms[k]) for k in sorted(arms, key=order)]


def mask_discovery_summary(md: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each arm's recovery of the full run's gain (claim 3's metric and rule), and one plain statement.

    An arm "recovers the full run" when its recovery is ≥ RECOVERY_HOLDS_MIN and beats the random
    arm's by ≥ RANDOM_GAP_MIN; with the full run's gain within noise, nothing can be recovered and
    the statement says so. Returns None without a mask_discovery.json.
    """
    if not md:
        return None
    source, full = md.get("source") or {}, md.get("full") or {}
    n = num(md.get("num_eval"))
    choice = choose_metric(source, full, n)
    arms = discovery_arms(md)
    metric = choice.metric or _pick_metric([source, full] + [r for _, r in arms])
    rows = []
    src = num(source.get(metric)) if metric else None
    fv = num(full.get(metric)) if metric else None
    usable = src is not None and fv is not None and fv != src
    for name, r in arms:
        v = num(r.get(metric)) if metric else None
        rows.append({"arm": name, "cost_steps": r.get("cost_steps"), "value": v,
                     "recovery": (v - src) / (fv - src) if usable and v is not None else None,
                     "overlap_with_final": num(r.get("overlap_with_final")), "overlap_chance": num(r.get("overlap_chance")),
                     "enrichment": num(r.get("enrichment")), "from_snapshot": num(r.get("from_snapshot")),
                     "trainable_fraction": num(r.get("trainable_fraction"))})
    out: dict[str, Any] = {"metric": metric, "metric_reason": choice.reason, "source": src, "full": fv,
                           "steps": md.get("steps"), "arms": rows}
    if metric is None or not usable or _no_gain(choice, metric, src, fv):
        out["statement"] = ("Early discovery cannot be judged: the full run did not improve on the source beyond "
                            "noise, so there is no gain to recover. " + choice.reason).strip()
        return out
    rand = next((r["recovery"] for r in rows if r["arm"] == "random"), None)
    found = [r for r in rows if r["arm"] not in ("final", "random") and r["recovery"] is not None
             and r["recovery"] >= RECOVERY_HOLDS_MIN and (rand is None or r["recovery"] - rand >= RANDOM_GAP_MIN)]
    cheapest = min(found, key=lambda r: r["cost_steps"] or 0) if found else None
    listing = ", ".join(f"{r['arm']} {fmt(r['recovery'], True)}" for r in rows if r["recovery"] is not None)
    final = next((r["recovery"] for r in rows if r["arm"] == "final"), None)
    if cheapest is None:
        out["statement"] = (f"No early or source-only mask recovered the full run (≥ {RECOVERY_HOLDS_MIN:.0%} of its "
                            f"gain and ≥ {RANDOM_GAP_MIN:.0%} above the random mask) on {metric}: {listing}.")
        if final is not None and final < RECOVERY_HOLDS_MIN:
            out["statement"] += (" Neither did the final mask: at this density retraining a mask falls short of the "
                                 "full run whichever mask it is, so the early masks are not what limits it.")
    else:
        cost = cheapest["cost_steps"] or 0
        out["statement"] = (f"A mask found after {cost} of {md.get('steps')} steps ({cheapest['arm']}) recovered "
                            f"{fmt(cheapest['recovery'], True)} of the full run's gain on {metric}: {listing}.")
    out["cheapest_recovering_arm"] = cheapest["arm"] if cheapest else None
    return out
