"""Render the report: findings table first, then one section per kind of input found.

The page is one self-contained file: CSS inline, figures as base64 PNG data URIs, no
scripts, no web fonts, so it opens offline. The same PNGs are written to `figures/`.

    sections = build_sections(found, rows)
    write_report(out_dir, rows, sections, title="opdlab report: opdlab-demo")
"""

from __future__ import annotations

import base64
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import jinja2
from matplotlib.figure import Figure

from opdlab import __version__
from opdlab.fileio import atomic_path, write_json, write_text
from opdlab.report import figures_runs as F
from opdlab.report.discover import Analysis, Found, companion_fp32, main_analyses, primary_analysis
from opdlab.report.claims_experiments import (
    closeness, mask_discovery_summary, second_moment_by_method, subnetwork_arms,
)
from opdlab.report.findings import group_rows
from opdlab.report.study_column import study_numbers
from opdlab.report.verdicts import Finding, fmt, num, precision_caveat
from opdlab.report.source_format import fine_pct, gguf_note, zero_fraction

VERDICT_CLASS = {"holds": "holds", "does not hold": "fails", "inconclusive": "inconclusive",
                 "not measured": "unmeasured"}
CURVES = (("eval/accuracy", "eval accuracy"), ("eval/reverse_kl", "eval reverse KL (teacher‖student)"),
          ("train/loss", "train loss"),
          # run.track_update_every: how the update grows and settles (subnet/update_tracker.py)
          ("update/changed_fraction", "bf16-visible changed fraction"),
          ("update/relative_norm", "update ‖Δ‖/‖W‖ (bf16)"),
          ("update/jaccard_previous", "changed-mask Jaccard with the previous measurement"))


@dataclass
class Image:
    """One embedded figure: `file` is its name under figures/, `png` the bytes."""

    title: str
    file: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    id: str
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "figure"


class _Figures:
    """Collects figures under unique file names."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def add(self, title: str, fig: Figure | bytes, stem: str | None = None) -> Image:
        base = _slug(stem or title)
        name, i = f"{base}.png", 2
        while name in self.names:
            name, i = f"{base}-{i}.png", i + 1
        self.names.add(name)
        return Image(title, name, fig if isinstance(fig, bytes) else F.figure_png(fig))


# ----------------------------------------------------------------------------- sections


def _pct(x: Any) -> str:
    return fmt(num(x), pct=True)


def _val(x: Any) -> str:
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    v = num(x)
    return fmt(v) if v is not None else ("" if x is None else str(x))


def _last(metrics: list[dict[str, Any]], key: str) -> Any:
    for m in reversed(metrics):
        if num(m.get(key)) is not None:
            return m[key]
    return None


def precision_section(found: Found, rows: list[Finding], figs: _Figures) -> Section | None:
    """bf16 vs fp32 figures of the main analysis and the lr sweep: how much of 'sparse' is rounding."""
    main = primary_analysis(found)
    sec = Section("precision", "Precision caveat: bf16 storage vs real sparsity")
    sec.notes.append("bf16 keeps 8 significant bits, so a change smaller than half a unit in the last place "
                     "(about |w|·2⁻⁹) is rounded away when a checkpoint is saved. Part of the 'unchanged' "
                     "coordinates of a bf16 checkpoint moved in fp32; small weights have small units, which "
                     "also bears on the near-zero finding.")
    if main is not None:
        fp32 = companion_fp32(found, main)
        _, vals = precision_caveat(main.summary, fp32.summary if fp32 else None)
        # Exact zeros of the base weights: ~0 for a dequantized GGUF base (it sits on a quantization grid).
        zeros = fine_pct(zero_fraction(main.data)) if zero_fraction(main.data) is not None else "n/a"
        sec.tables.append(Table(["analysis", "sparsity bf16", "sparsity fp32", "update < ½ ULP", "rounding share",
                                 "base exact zeros"],
                                [[main.name] + [_pct(vals[k]) for k in ("sparsity_bf16", "sparsity_fp32",
                                                                         "below_half_ulp_fraction", "rounding_share")]
                                 + [zeros]]))
        note = gguf_note(main.data, fp32.data if fp32 else None, main.name)
        if note:
            sec.notes.append(note)
    near_zero = next((r for r in rows if r.number == 7 and r.values), None)
    if near_zero is not None:
        sec.notes.append(f"Near-zero finding (claim 7): low-magnitude enrichment "
                         f"{fmt(near_zero.values.get('low_magnitude_enrichment'))} in bf16, "
                         f"{fmt(near_zero.values.get('low_magnitude_enrichment_fp32'))} in fp32.")
    points = (found.lr_sweep or {}).get("points") or []
    if points:
        sec.tables.append(Table(
            ["lr", "sparsity bf16", "sparsity fp32", "update < ½ ULP", "‖Δ‖/‖W‖", "accuracy", "analysis"],
            [[_val(p.get("lr")), _pct(p.get("sparsity_bf16")), _pct(p.get("sparsity_fp32")),
              _pct(p.get("below_half_ulp_fraction")), _val(p.get("relative_update_norm")), _val(p.get("accuracy")),
              str(p.get("analysis_dir") or "")] for p in sorted(points, key=lambda p: num(p.get("lr")) or 0)],
            "Learning-rate sweep (lr_sweep.json)"))
        sec.images.append(figs.add("Sparsity vs learning rate, bf16 and fp32", F.lr_sweep_sparsity(points),
                                   "lr-sweep-sparsity"))
    return sec if main is not None or points else None


def demo_section(found: Found) -> Section | None:
    demo = found.demo
    if not demo:
        return None
    sec = Section("demo", "Demo")
    sec.notes.append(f"preset {demo.get('preset', '?')}; total {_val(demo.get('total_s'))} s; "
                     f"opdlab {demo.get('opdlab_version', '?')}")
    stages = [s for s in demo.get("stages") or [] if isinstance(s, dict)]
    sec.tables.append(Table(["stage", "kind", "path", "seconds", "status"],
                            [[str(s.get("name", "")), str(s.get("kind", "")), str(s.get("path", "")),
                              _val(s.get("seconds")), str(s.get("status", ""))] for s in stages]))
    return sec


def training_section(found: Found, figs: _Figures) -> Section | None:
    """Curves of every run (grouped by parent folder, so sweeps do not crowd the main runs) and a table."""
    if not found.runs:
        return None
    sec = Section("training", "Training runs")
    sec.tables.append(Table(
        ["run", "method", "optimizer", "lr", "steps", "final eval accuracy", "final eval reverse KL", "mask"],
        [[r.name, str(r.method or "?"), str((r.config.get("optim") or {}).get("optimizer", "?")),
          _val((r.config.get("optim") or {}).get("lr")), _val(_last(r.metrics, "step")),
          _val(_last(r.metrics, "eval/accuracy")), _val(_last(r.metrics, "eval/reverse_kl")),
          "yes" if (r.config.get("optim") or {}).get("mask") else ""] for r in found.runs]))
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in found.runs:
        parent = r.name.rsplit("/", 1)[0] if "/" in r.name else ""
        groups.setdefault(parent, {})[r.name.rsplit("/", 1)[-1]] = r.metrics
    for parent, runs in groups.items():
        for key, label in CURVES:
            if any(F.series(m, key)[0] for m in runs.values()):
                title = f"{label}{' (' + parent + ')' if parent else ''}"
                sec.images.append(figs.add(title, F.training_curves(runs, key, label), f"curve {parent} {key}"))
    return sec


def _with_group(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Group rows in figures_analysis's shape ("group", "num_params") whichever shape they were written in."""
    return [{**r, "group": r[kind], "num_params": r["numel"]} for r in rows]


def _draw(jobs: list[tuple[str, Callable[[Path], Path]]], figs: _Figures, owner: str, notes: list[str]) -> list[Image]:
    """Run figures_analysis functions (they write PNG files) in a temporary folder and embed the results.

    A figure whose table lacks a column it needs is skipped with a note, so one odd table does not
    cost the whole report.
    """
    images: list[Image] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (title, make) in enumerate(jobs):
            try:
                png = make(Path(tmp) / f"{i}.png").read_bytes()
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                notes.append(f"{owner}: figure '{title}' skipped ({type(exc).__name__}: {exc}).")
                continue
            images.append(figs.add(f"{title} ({owner})", png, f"{owner} {title}"))
    return images


def _analysis_figures(a: Analysis, figs: _Figures, notes: list[str]) -> list[Image]:
    """The PNGs `opdlab analyze` wrote into the folder; without any, the same figures drawn from its tables
    by `figures_analysis` (the functions `analyze` itself uses)."""
    if a.pngs:
        return [figs.add(f"{p.stem.replace('_', ' ')} ({a.name})", p.read_bytes(), f"{a.name} {p.stem}")
                for p in a.pngs]
    from opdlab.report import figures_analysis as FA  # loads matplotlib: only when a figure must be drawn

    layers, modules, summary = group_rows(a.data, "layer"), group_rows(a.data, "module"), a.summary
    jobs: list[tuple[str, Callable[[Path], Path]]] = []
    if layers:
        jobs.append(("sparsity by layer", lambda p: FA.layer_sparsity(_with_group(layers, "layer"), p)))
    if a.tensors and "delta_sq" in a.tensors[0]:
        jobs.append(("relative update by layer and module", lambda p: FA.movement_heatmap(a.tensors, p)))
    if modules:
        jobs.append(("energy share by module", lambda p: FA.energy_share_by_module(_with_group(modules, "module"), p)))
    if "principal_energy_both_rho_0.1" in summary:
        jobs.append(("principal-subspace energy by rho", lambda p: FA.principal_energy_by_rho(summary, p)))
    if "low_magnitude_enrichment_rho_0.1" in summary:
        jobs.append(("magnitude enrichment by rho", lambda p: FA.magnitude_enrichment_by_rho(summary, p)))
    return _draw(jobs, figs, a.name, notes)


SUMMARY_COLUMNS = (("sparsity", "sparsity", True), ("sparsity_fp32", "sparsity fp32", True),
                   ("relative_update_norm", "‖Δ‖/‖W‖", False),
                   ("median_rank_fraction_tol_1e-05", "rank frac.", False),
                   ("median_top8_energy", "top-8 energy", False), ("principal_energy_both_rho_0.1", "E_both ρ=.1", False),
                   ("principal_energy_both_rho_0.1_random", "random", False),
                   ("low_magnitude_enrichment_rho_0.1", "low-mag enr.", False))


def analysis_section(found: Found, figs: _Figures) -> Section | None:
    if not found.analyses:
        return None
    sec = Section("analysis", "Parameter analyses")
    sec.tables.append(Table(["analysis", "method", "dtype"] + [c[1] for c in SUMMARY_COLUMNS],
                            [[a.name, str(a.method or "?"), a.dtype] +
                             [_pct(a.summary.get(k)) if p else _val(a.summary.get(k)) for k, _, p in SUMMARY_COLUMNS]
                             for a in found.analyses]))
    for a in main_analyses(found):
        blocks = group_rows(a.data, "block")
        if blocks:
            sec.tables.append(Table(["block", "numel", "sparsity", "‖Δ‖/‖W‖", "energy share"],
                                    [[str(b.get("block")), _val(b.get("numel")), _pct(b.get("sparsity")),
                                      _val(b.get("relative_update_norm")), _pct(b.get("energy_share"))] for b in blocks],
                                    f"{a.name}: by block"))
        sec.images.extend(_analysis_figures(a, figs, sec.notes))
    return sec


def compare_section(found: Found, figs: _Figures) -> Section | None:
    if not found.compares:
        return None
    sec = Section("compare", "Overlap between runs")
    keys = ("jaccard", "jaccard_random", "jaccard_ratio", "coverage_a", "coverage_a_ratio", "coverage_b",
            "coverage_b_ratio", "density_a", "density_b")
    sec.tables.append(Table(["compare", "run A", "run B"] + list(keys),
                            [[c.name, str(c.data.get("run_a", "")), str(c.data.get("run_b", ""))] +
                             [_val((c.data.get("summary") or {}).get(k)) for k in keys] for c in found.compares]))
    summaries = {c.name: c.data.get("summary") or {} for c in found.compares}
    sec.images.append(figs.add("Jaccard of changed masks vs chance", F.overlap_bars(summaries), "overlap"))
    for c in found.compares:
        pngs = sorted(c.path.glob("*.png"))
        if pngs:
            sec.images.extend(figs.add(f"{p.stem.replace('_', ' ')} ({c.name})", p.read_bytes(), f"{c.name} {p.stem}")
                              for p in pngs)
            continue
        modules = group_rows(c.data, "module")
        if modules:
            from opdlab.report import figures_analysis as FA  # loads matplotlib: only when a figure must be drawn

            sec.images.extend(_draw([("Jaccard by module", lambda p, m=modules: FA.compare_jaccard_by_module(
                _with_group(m, "module"), p))], figs, c.name, sec.notes))
    return sec


def subnetwork_section(found: Found, figs: _Figures) -> Section | None:
    sub = found.subnetwork
    if not sub:
        return None
    sec = Section("subnetwork", "Subnetwork retraining")
    src = sub.get("source") or {}
    rows = [["source", _val(src.get("accuracy")), _val(src.get("reverse_kl")), "", "", "", str(src.get("path", ""))]]
    for name, r in subnetwork_arms(sub).items():
        equal, distance = closeness(r)
        rows.append([name, _val(r.get("accuracy")), _val(r.get("reverse_kl")), _pct(r.get("trainable_fraction")),
                     _pct(equal) if equal is not None else "", _val(distance), str(r.get("run_dir", ""))])
    sec.tables.append(Table(["arm", "accuracy", "eval reverse KL", "trainable", "equal to full (±1e-5)",
                             "distance to full", "run folder"], rows))
    if any(num(r.get(k)) is not None for r in subnetwork_arms(sub).values() for k in ("accuracy", "reverse_kl")):
        fig = F.subnetwork_bars(src, subnetwork_arms(sub))
        sec.images.append(figs.add("Subnetwork retraining vs full OPD", fig, "subnetwork"))
    return sec


def discovery_section(found: Found) -> Section | None:
    """Early subnetwork discovery: each mask's cost, recovery of the full run's gain and overlap with the final mask."""
    summary = mask_discovery_summary(found.mask_discovery)
    if summary is None:
        return None
    sec = Section("mask-discovery", "Early subnetwork discovery")
    sec.notes.append(summary["statement"])
    sec.notes.append("Every arm retrains from the source on as many coordinates per tensor as the final mask holds; "
                     "step-K is the full run's changed mask after K steps, resized to that density (random subset, or "
                     "filled up at random); source is the lowest-|W| coordinates; recovery = (arm − source)/(full − "
                     f"source) on {summary['metric']}; enrichment = share inside the final mask over chance.")
    rows = [[r["arm"], str(r["cost_steps"]), _val(r["value"]), _pct(r["recovery"]), _pct(r["overlap_with_final"]),
             _pct(r["overlap_chance"]), _val(r["enrichment"]), _pct(r["from_snapshot"])] for r in summary["arms"]]
    sec.tables.append(Table(["arm", "steps to find", str(summary["metric"]), "recovery", "inside final mask",
                             "by chance", "enrichment", "kept from snapshot"], rows))
    return sec


def optimizers_section(found: Found, figs: _Figures) -> Section | None:
    opt = found.optimizers
    if not opt:
        return None
    sec = Section("optimizers", "AdamW vs SGD")
    sweep = [r for r in opt.get("sweep") or [] if isinstance(r, dict)]
    sec.tables.append(Table(["optimizer", "lr", "accuracy", "eval reverse KL", "run folder"],
                            [[str(r.get("optimizer")), _val(r.get("lr")), _val(r.get("accuracy")),
                              _val(r.get("reverse_kl")), str(r.get("run_dir", ""))] for r in sweep]))
    metric = "accuracy" if any(num(r.get("accuracy")) is not None for r in sweep) else "reverse_kl"
    if any(num(r.get(metric)) is not None for r in sweep):
        sec.images.append(figs.add("Optimizer sweep", F.optimizer_sweep(sweep, metric), "optimizer-sweep"))
    cv = second_moment_by_method(opt)
    if any(v is not None for v in cv.values()):
        sec.notes.append("Adam's second moment: coefficient of variation of √v within each tensor, median over "
                         "tensors (a high value means per-coordinate step sizes differ widely, which SGD cannot do).")
        sec.images.append(figs.add("Adam second-moment spread by method", F.second_moment_cv(cv), "second-moment-cv"))
    return sec


def build_sections(found: Found, rows: list[Finding]) -> tuple[list[Section], _Figures]:
    """Every section that has data, in reading order."""
    figs = _Figures()
    makers = (lambda: precision_section(found, rows, figs), lambda: demo_section(found),
              lambda: training_section(found, figs), lambda: analysis_section(found, figs),
              lambda: compare_section(found, figs), lambda: subnetwork_section(found, figs),
              lambda: discovery_section(found), lambda: optimizers_section(found, figs))
    return [s for s in (m() for m in makers) if s is not None], figs


# ----------------------------------------------------------------------------- page


def render(rows: list[Finding], sections: list[Section], title: str, source: str) -> str:
    """The whole HTML page as a string."""
    here = Path(__file__).parent
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(here)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("template.html").render(
        title=title, source=source, rows=rows, sections=sections, verdict_class=VERDICT_CLASS, fmt=fmt,
        study_source=study_numbers()["source"], study_caveat=study_numbers()["caveat"],
        css=(here / "style.css").read_text(encoding="utf-8"), version=__version__,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_report(out_dir: Path, rows: list[Finding], sections: list[Section], title: str, source: str,
                 mask_discovery: dict[str, Any] | None = None) -> Path:
    """Write figures/, findings.json and (last, so its presence means done) report.html; all atomically.

    `mask_discovery`: `mask_discovery_summary` of the experiment, kept in findings.json beside the claims."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [img for s in sections for img in s.images]
    with atomic_path(out_dir / "figures") as tmp:
        tmp.mkdir()
        for img in images:
            (tmp / img.file).write_bytes(img.png)
    write_json(out_dir / "findings.json", {"schema": 1, "source": source, "findings": [
        {"number": r.number, "claim": r.claim, "verdict": r.verdict, "measured": r.measured, "control": r.control,
         "rule": r.rule, "caveat": r.caveat, "source": r.source, "values": r.values, "study": r.study}
        for r in rows], "study_numbers": {"source": study_numbers()["source"], "caveat": study_numbers()["caveat"]},
        **({"mask_discovery": mask_discovery} if mask_discovery else {})})
    return write_text(out_dir / "report.html", render(rows, sections, title, source))
