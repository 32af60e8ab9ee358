"""The study's reported numbers beside opdlab's, claim by claim, each figure computed the study's way.

    rows = build_findings(inputs)          # attaches row.study through add_study_column
    rows[0].study  # [{"figure": "‖Δ‖/‖W‖", "opdlab": 0.0006, "study": 0.00036, "setting": "Qwen3-4B -> OPSD"}, ...]

The reference values ship in `study_numbers.json` (reported by arXiv 2606.13657; transcribed from
a published reading note, as its `caveat` says). The closest setting is the study's Qwen3-4B
OPSD row for a self-distillation run (method opsd) and its DS-Qwen OPD row (DeepScaleR teacher)
otherwise. Like with like: spectral and subspace figures are medians over matrices (opdlab's
summary weights by energy), sparsity is the share with |Δ| ≤ 1e-5, and a mask's coverage is the
share of visible updates inside a 10 % mask, i.e. enrichment × 0.1.
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path
from typing import Any

from opdlab.report.verdicts import Finding, FindingInputs, num

OPSD_SETTING = "Qwen3-4B -> OPSD"
OPD_SETTING = "DS-Qwen -> DS-Qwen OPD (DeepScaleR teacher)"
MODULE_SETTING = {OPSD_SETTING: "Qwen3 OPSD", OPD_SETTING: "DS-Qwen OPD"}
COVERAGE_MASK = 0.1  # the study's masks hold 10 % of the coordinates


@functools.cache
def study_numbers() -> dict[str, Any]:
    """The shipped reference file (parsed once)."""
    return json.loads((Path(__file__).parent / "study_numbers.json").read_text(encoding="utf-8"))


def closest_setting(method_label: str | None) -> str:
    """The study's row closest to a run of this method: its OPSD row for opsd, its DS-Qwen OPD row otherwise."""
    return OPSD_SETTING if method_label == "opsd" else OPD_SETTING


def _global(setting: str) -> dict[str, Any]:
    return next(r for r in study_numbers()["global"] if r["pair"] == setting)


def _method_row(method: str) -> dict[str, Any]:
    return next(r for r in study_numbers()["global"] if r["method"] == method)


def median_over_matrices(tensors: list[dict[str, Any]], column: str) -> float | None:
    """Median of a tensors.csv column over the rows that have a finite value (the matrices)."""
    values = [v for v in (num(r.get(column)) for r in tensors) if v is not None]
    return statistics.median(values) if values else None


def _times(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def _block_share(inp: FindingInputs, names: set[str]) -> float | None:
    groups = (inp.analysis or {}).get("groups") or {}
    for row in groups.get("block") or [] if isinstance(groups, dict) else []:
        if isinstance(row, dict) and str(row.get("block", row.get("group", ""))).lower() in names:
            return num(row.get("energy_share"))
    return None


def _entry(figure: str, opdlab: float | None, study: float | None, setting: str, how: str = "") -> dict[str, Any]:
    return {"figure": figure, "opdlab": opdlab, "study": study, "setting": setting, "how": how}


def study_entries(inp: FindingInputs) -> dict[int, list[dict[str, Any]]]:
    """{claim number: the figures opdlab measured, each with the study's number for its closest setting}."""
    setting = closest_setting(inp.method_labels.get("opd"))
    ref = _global(setting)
    summary = (inp.analysis or {}).get("summary") or {}
    out: dict[int, list[dict[str, Any]]] = {}
    out[1] = [_entry("‖Δ‖/‖W‖", num(summary.get("relative_update_norm")), ref["relative_update_norm"], setting),
              _entry("sparsity (|Δ| ≤ 1e-5, bf16)", num(summary.get("sparsity_atol_1e-05")),
                     ref["sparsity_atol_1e-05"], setting)]
    modules = study_numbers()["module_energy_share"][MODULE_SETTING[setting]]
    out[2] = [_entry("FFN share of ‖Δ‖²", _block_share(inp, {"mlp", "ffn"}), modules["ffn"], setting),
              _entry("attention share of ‖Δ‖²", _block_share(inp, {"attention", "attn", "self_attn"}),
                     modules["attention"], setting)]
    sub_ref = study_numbers()["subnetwork"]["DS-Qwen"]
    runs = ((inp.subnetwork or {}).get("runs") or {})
    def ratio(arm: str) -> float | None:
        """An arm's final accuracy over the full run's (the study's retraining table, read as ratios)."""
        a, f = num((runs.get(arm) or {}).get("accuracy")), num((runs.get("full") or {}).get("accuracy"))
        return a / f if a is not None and f else None
    out[3] = [_entry("OPD-mask accuracy / full", ratio("subnetwork"), sub_ref["opd_mask"] / sub_ref["full"],
                     "DS-Qwen OPD, AIME24/25 peak mean@16"),
              _entry("random-mask accuracy / full", ratio("random"), sub_ref["random_mask"] / sub_ref["full"],
                     "DS-Qwen OPD, AIME24/25 peak mean@16"),
              _entry("OPD-mask density", num(((inp.subnetwork or {}).get("mask") or {}).get("density")),
                     sub_ref["opd_mask_density"], "DS-Qwen OPD")]
    opt_ref = study_numbers()["optimizers"]
    cv = (((inp.optimizers or {}).get("second_moment_cv") or {}).get("opd") or {})
    out[4] = [_entry("Adam √v coefficient of variation (mean over tensors)", num(cv.get("mean_cv")),
                     opt_ref["adam_second_moment_mean_cv"], opt_ref["setting"]),
              _entry("SGD / AdamW best accuracy", _sgd_over_adamw(inp.optimizers),
                     opt_ref["sgd"]["peak"] / opt_ref["adamw"]["peak"], opt_ref["setting"])]
    out[5] = [_entry("top-16 energy share of Δ (median over matrices)", num(summary.get("median_top16_energy")),
                     ref["top16_energy"], setting),
              _entry("stable rank of Δ (median over matrices)", num(summary.get("median_stable_rank")),
                     ref["stable_rank"], setting)]
    out[6] = [_entry("principal-mask coverage (median over matrices)",
                     _times(median_over_matrices(inp.tensors, "principal_mask_enrichment_rho_0.1"), COVERAGE_MASK),
                     ref["principal_coverage"], setting, "enrichment × 0.1")]
    out[7] = [_entry("low-magnitude-mask coverage", _times(num(summary.get("low_magnitude_enrichment_rho_0.1")),
                                                          COVERAGE_MASK),
                     ref["low_magnitude_coverage"], setting, "enrichment × 0.1")]
    by = {m: ((a.get("summary") or {}) if isinstance(a, dict) else {}) for m, a in inp.by_method.items()}
    out[8] = [_entry(f"{label} sparsity (|Δ| ≤ 1e-5)", num(by.get(m, {}).get("sparsity_atol_1e-05")),
                     study_ref["sparsity_atol_1e-05"], study_ref["pair"])
              for m, label, study_ref in (("opd", "OPD", ref), ("rl", "RL", _method_row("RLVR")),
                                          ("sft", "SFT (study: offline distillation)",
                                           _method_row("offline distillation")))]
    return out


def _sgd_over_adamw(opt: dict[str, Any] | None) -> float | None:
    """Best SGD-variant accuracy over best AdamW accuracy in an optimizers.json sweep."""
    best: dict[str, float] = {}
    for row in (opt or {}).get("sweep") or []:
        name, acc = str(row.get("optimizer")), num(row.get("accuracy"))
        if acc is not None:
            family = "adamw" if name == "adamw" else "sgd"
            best[family] = max(best.get(family, acc), acc)
    return best["sgd"] / best["adamw"] if best.get("adamw") and "sgd" in best else None


def add_study_column(rows: list[Finding], inp: FindingInputs) -> list[Finding]:
    """Attach each row's study entries (only for claims opdlab measured)."""
    entries = study_entries(inp)
    for row in rows:
        row.study = [e for e in entries.get(row.number, []) if e["opdlab"] is not None]
    return rows
