"""Per-tensor agreement between `opdlab analyze` and the study's `analyze_opd_delta.py`.

    table = agreement(Path("out/opdlab"), Path("out/reference"))

The study's script writes one CSV per metric family (tensor_metrics, svd_metrics,
base_geometry_metrics, mask_overlap_metrics); opdlab writes one tensors.csv. `SHARED` maps
each study column to the opdlab column with the same definition (DESIGN "Analysis:
definitions"). For every pair the table gives the number of tensors compared and the largest
and median relative difference |opdlab − study| / |study| (None when no tensor has both). `NOT_SHARED` lists study columns
that look alike but are defined differently, and why; they are left out.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import torch
from safetensors import safe_open

RHOS = {"1pct": "0.01", "5pct": "0.05", "10pct": "0.1", "20pct": "0.2"}

# (study file, study column, opdlab column, row filter on the study file)
SHARED: list[tuple[str, str, str, dict[str, str]]] = [
    ("tensor_metrics.csv", "frac_delta_eq_0", "sparsity", {}),
    ("tensor_metrics.csv", "relative_delta_fro", "relative_update_norm", {}),
    *[("tensor_metrics.csv", f"frac_abs_delta_lt_{e}", f"frac_below_eps_{o}", {})
      for e, o in (("1e-8", "1e-08"), ("1e-7", "1e-07"), ("1e-6", "1e-06"), ("1e-5", "1e-05"), ("1e-4", "1e-04"))],
    *[("tensor_metrics.csv", f"frac_abs_delta_lt_{t}_src_rms", f"frac_below_rms_{o}", {})
      for t, o in (("1e-4", "1e-04"), ("1e-3", "1e-03"), ("1e-2", "1e-02"))],
    *[("tensor_metrics.csv", f"coord_top_{p}_energy_ratio", f"coord_energy_top_{o}pct", {})
      for p, o in (("0p1pct", "0.1"), ("1pct", "1"), ("5pct", "5"))],
    *[("svd_metrics.csv", f"rank_pct_tol_1e_{t}", f"rank_fraction_tol_1e-0{t}", {}) for t in (6, 5, 4)],
    *[("svd_metrics.csv", f"top{k}_energy_ratio", f"top{k}_energy", {}) for k in (1, 2, 4, 8, 16, 32, 64)],
    ("svd_metrics.csv", "stable_rank", "stable_rank", {}),
    ("svd_metrics.csv", "effective_rank_entropy", "effective_rank", {}),
    *[("base_geometry_metrics.csv", f"{side}principal_projection_energy_ratio_{label}",
       f"principal_energy_{name}_rho_{rho}", {})
      for label, rho in RHOS.items() for side, name in (("", "both"), ("left_", "left"), ("right_", "right"))],
    *[("base_geometry_metrics.csv", f"top_subspace_rotation_{label}", f"rotation_rho_{rho}", {})
      for label, rho in RHOS.items()],
    ("base_geometry_metrics.csv", "spectral_drift_l2_ratio", "spectral_drift", {}),
    *[("mask_overlap_metrics.csv", f"principal_{label}_enrichment_vs_random", f"principal_mask_enrichment_rho_{rho}",
       {"update_mask_atol": "0.0"}) for label, rho in RHOS.items()],
    *[("mask_overlap_metrics.csv", f"low_magnitude_{label}_enrichment_vs_random", f"low_magnitude_enrichment_rho_{rho}",
       {"update_mask_atol": "0.0"}) for label, rho in RHOS.items()],
]

NOT_SHARED = {
    "top{1,5,10}pct_energy_ratio": "the study takes k = ⌊p·min(m,n)⌋ singular values, opdlab ⌈p·min(m,n)⌉ "
                                   "(top_<p>pct_sv_energy): different k for 896-wide matrices",
    "frac_isclose_zero_atol_*": "torch.isclose also has a relative tolerance (rtol 1e-5 of 0): same as |Δ| ≤ atol, "
                                "which opdlab reports only for atol 1e-5 (sparsity_atol_1e-05)",
}


def _read(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV ([] when the file is missing or empty: the study writes empty files for empty tables)."""
    if not path.is_file() or path.stat().st_size <= 1:
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _num(x: str | None) -> float:
    try:
        return float(x) if x not in (None, "") else math.nan
    except ValueError:
        return math.nan


def agreement(opdlab_dir: Path, reference_dir: Path) -> list[dict]:
    """One row per shared metric: tensors compared, max and median relative difference, worst tensor."""
    ours = {r["name"]: r for r in _read(opdlab_dir / "tensors.csv")}
    files: dict[str, list[dict[str, str]]] = {}
    table = []
    for fname, theirs_col, ours_col, where in SHARED:
        if fname not in files:
            files[fname] = _read(reference_dir / fname)
        diffs: list[tuple[float, str]] = []
        for row in files[fname]:
            if any(row.get(k) != v for k, v in where.items()) or row["name"] not in ours:
                continue
            a, b = _num(ours[row["name"]].get(ours_col)), _num(row.get(theirs_col))
            if math.isnan(a) or math.isnan(b):
                continue
            diffs.append((abs(a - b) / max(abs(b), 1e-12), row["name"]))
        worst = max(diffs, default=(None, None))
        table.append({"study": f"{fname}:{theirs_col}", "opdlab": ours_col, "tensors": len(diffs),
                      "max_rel_diff": worst[0], "median_rel_diff": statistics.median(d for d, _ in diffs) if diffs else None,
                      "worst_tensor": worst[1]})
    return table


def summarize(table: list[dict], tolerance: float = 0.01) -> dict:
    """Whether every shared metric agrees within `tolerance` (relative), and the ones that do not
    (with those whose every difference is within 3 sd of the study's tie-break listed apart)."""
    compared = [r for r in table if r["tensors"] > 0]
    beyond = [r["opdlab"] for r in compared if r["max_rel_diff"] > tolerance]
    ties = [r["opdlab"] for r in compared if r["opdlab"] in beyond and (r.get("max_tie_z") or math.inf) <= 3]
    return {"tolerance": tolerance, "metrics_compared": len(compared), "metrics_beyond_tolerance": beyond,
            "beyond_but_within_3_sd_of_tie_break": ties, "all_within": not beyond and bool(compared),
            "max_rel_diff": max((r["max_rel_diff"] for r in compared), default=None)}


def _open(folder: Path):  # noqa: ANN202 - safetensors handle
    return safe_open(str(folder / "model.safetensors"), framework="pt")


def tie_spread(base: Path, tuned: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """Per 2-D tensor and ρ: relative sd of the low-magnitude hit count under a random tie-break.

    The ⌈ρn⌉ smallest |W| include all entries below the threshold value t and s of the T
    entries equal to t, h of which changed; the hits inside the tie are hypergeometric with
    variance s·(h/T)(1 − h/T)(T − s)/(T − 1). Returned: sd / expected total hits.
    """
    out: dict[str, dict[str, float]] = {}
    fa, fb = _open(base), _open(tuned)
    for name in names:
        w = fa.get_tensor(name)
        if w.dim() != 2:
            continue
        changed = (fb.get_tensor(name).float() != w.float()).reshape(-1)
        a = w.float().abs().reshape(-1)
        values, counts = torch.unique(a, return_counts=True)  # sorted ascending
        cum = counts.cumsum(0)
        out[name] = {}
        for label, rho in RHOS.items():
            k = max(1, math.ceil(float(rho) * a.numel() - 1e-9))
            j = int(torch.searchsorted(cum, torch.tensor([k])))
            t = values[j]
            below = int(cum[j - 1]) if j > 0 else 0
            tie = a == t
            big_t, s_sel, h = int(counts[j]), k - below, int((tie & changed).sum())
            var = s_sel * (h / big_t) * (1 - h / big_t) * (big_t - s_sel) / (big_t - 1) if big_t > 1 else 0.0
            expected = int(((a < t) & changed).sum()) + s_sel * h / big_t
            out[name][rho] = math.sqrt(var) / expected if expected > 0 else math.nan
    return out


def add_tie_z(table: list[dict], opdlab_dir: Path, reference_dir: Path, spread: dict[str, dict[str, float]]) -> None:
    """For the low-magnitude rows: the largest |difference| in units of the tie-break sd."""
    ours = {r["name"]: r for r in _read(opdlab_dir / "tensors.csv")}
    theirs = [r for r in _read(reference_dir / "mask_overlap_metrics.csv") if r.get("update_mask_atol") == "0.0"]
    for row in table:
        if not row["opdlab"].startswith("low_magnitude_enrichment_rho_"):
            continue
        rho = row["opdlab"].rsplit("_", 1)[1]
        label = next(lab for lab, r in RHOS.items() if r == rho)
        zs = []
        for r in theirs:
            sd = spread.get(r["name"], {}).get(rho)
            a, b = _num(ours.get(r["name"], {}).get(row["opdlab"])), _num(r.get(f"low_magnitude_{label}_enrichment_vs_random"))
            if sd is None or math.isnan(a) or math.isnan(b):
                continue
            rel = abs(a - b) / max(abs(b), 1e-12)
            zs.append(rel / sd if sd > 0 else (0.0 if rel < 1e-9 else math.inf))
        row["max_tie_z"] = max(zs, default=None)


def fp64_check(base: Path, tuned: Path, names: list[str], opdlab_dir: Path, reference_dir: Path) -> list[dict]:
    """Rotation, drift and projection energies of each named matrix by fp64 SVD, and both tools' errors."""
    ours = {r["name"]: r for r in _read(opdlab_dir / "tensors.csv")}
    theirs = {r["name"]: r for r in _read(reference_dir / "base_geometry_metrics.csv")}
    fa, fb = _open(base), _open(tuned)
    rows = []
    for name in names if theirs else []:
        w, w2 = fa.get_tensor(name).double(), fb.get_tensor(name).double()
        d = w2 - w
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u2, s2, _ = torch.linalg.svd(w2, full_matrices=False)
        dsq = float(d.pow(2).sum())
        truth = {"spectral_drift": (float((s2 - s).norm() / s.norm()), "spectral_drift_l2_ratio")}
        for label, rho in RHOS.items():
            k = max(1, int(float(rho) * min(w.shape)))
            uk, vk = u[:, :k], vh[:k].T
            cos = torch.linalg.svdvals(uk.T @ u2[:, :k]).clamp(max=1)
            truth[f"rotation_rho_{rho}"] = (float((1 - cos**2).clamp_min(0).sqrt().mean()), f"top_subspace_rotation_{label}")
            truth[f"principal_energy_both_rho_{rho}"] = (float((uk.T @ d @ vk).pow(2).sum()) / dsq,
                                                         f"principal_projection_energy_ratio_{label}")
        for key, (value, study_col) in truth.items():
            if math.isnan(_num(ours[name][key])):  # ρ·min(m,n) < 1: the ρ does not apply in opdlab
                continue
            rows.append({"tensor": name, "metric": key, "fp64": value,
                         "opdlab_rel_err": abs(_num(ours[name][key]) - value) / abs(value),
                         "study_rel_err": abs(_num(theirs[name][study_col]) - value) / abs(value)})
    return rows
