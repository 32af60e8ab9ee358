"""The stages every demo shares: the manifest of finished stages, analysis, and the report.

    manifest = Manifest(out, "default", resume=False)
    manifest.run("opd", "run", out / "runs" / "opd", lambda: train(...), out)   # skipped when done before
    analyze_runs(manifest, source, {"opd": out / "runs" / "opd"}, out)
    write_report(manifest, out, runs)      # report/report.html, and the findings on the terminal

`opdlab demo` (recipes/demo.py), `--vlm` (recipes/demo_vlm.py) and `--real` (recipes/demo_real.py)
each call these; they import none of each other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from opdlab import __version__
from opdlab.config import AnalyzeConfig, ReportConfig, load_config
from opdlab.errors import UserError
from opdlab.fileio import write_json
from opdlab.recipes.analyze import analyze
from opdlab.recipes.experiment import final_eval
from opdlab.recipes.report import report
from opdlab.report.discover import discover, findings_inputs
from opdlab.report.findings import build_findings, format_table


class Manifest:
    """`demo.json`: which stages ran, where their results are, and how long they took."""

    def __init__(self, out: Path, preset: str, resume: bool) -> None:
        self.path = out / "demo.json"
        self.started = time.time()
        old = json.loads(self.path.read_text(encoding="utf-8")) if resume and self.path.is_file() else {}
        self.data: dict[str, Any] = {"schema": 1, "preset": preset, "opdlab_version": __version__,
                                     "stages": old.get("stages", []), "total_s": old.get("total_s", 0.0)}
        self._base_total = float(self.data["total_s"] or 0.0)

    def done(self, name: str) -> dict[str, Any] | None:
        for s in self.data["stages"]:
            if s["name"] == name and s["status"] == "done":
                return s
        return None

    def run(self, name: str, kind: str, path: Path, func: Callable[[], Any], out: Path) -> Any:
        """Run one stage unless it finished before; record it either way."""
        if self.done(name) and path.exists():
            print(f"  [skip] {name}: done before ({path.relative_to(out)})")
            return path
        print(f"  [{kind}] {name} ...", flush=True)
        t0 = time.time()
        result = func()
        seconds = round(time.time() - t0, 1)
        self.data["stages"] = [s for s in self.data["stages"] if s["name"] != name]
        self.data["stages"].append({"name": name, "kind": kind, "path": str(path.relative_to(out)),
                                    "seconds": seconds, "status": "done"})
        self.data["total_s"] = round(self._base_total + time.time() - self.started, 1)
        write_json(self.path, self.data)
        print(f"  [{kind}] {name}: {seconds:.0f} s", flush=True)
        return result


def analyze_pair(source: Path, tuned: Path, dest: Path, dtype: str = "bf16") -> Path:
    """`opdlab analyze SOURCE TUNED --out DEST` (replacing an earlier DEST)."""
    return analyze(load_config(AnalyzeConfig, None, {"base": str(source), "tuned": str(tuned), "out": str(dest),
                                                     "dtype": dtype, "overwrite": True}))


def analyze_runs(manifest: Manifest, source: Path, runs: dict[str, Path], out: Path) -> None:
    """Analyze every run against the source in bf16, plus the fp32 twin of opd (precision control)."""
    for name, run_dir in runs.items():
        dest = out / "analysis" / name
        manifest.run(f"analysis-{name}", "analysis", dest, lambda r=run_dir, d=dest: analyze_pair(source, r, d), out)
    dest = out / "analysis" / "opd-fp32"
    manifest.run("analysis-opd-fp32", "analysis", dest, lambda: analyze_pair(source, runs["opd"], dest, "fp32"), out)


def write_report(manifest: Manifest, out: Path, runs: dict[str, Path]) -> Path:
    """Render the report from everything in `out`, print the findings table, return report.html."""
    report_dir = out / "report"
    manifest.run("report", "report", report_dir, lambda: report(load_config(ReportConfig, None, {
        "path": str(out), "out": str(report_dir)})), out)
    print_findings(report_dir / "findings.json", runs)
    print(f"report: {report_dir / 'report.html'}")
    print(f"demo finished in {manifest.data['total_s'] / 60:.1f} min", flush=True)
    return report_dir / "report.html"


def print_findings(findings_file: Path, runs: dict[str, Path]) -> None:
    """A short table of the runs and the findings on the terminal."""
    print("\nruns (held-out accuracy, teacher-student reverse KL per token: start -> end)")
    for name, run_dir in runs.items():
        try:
            e = final_eval(run_dir)
        except UserError:
            continue
        print(f"  {name:<12} acc {_fmt(e['accuracy_start'])} -> {_fmt(e['accuracy'])}   "
              f"KL {_fmt(e['reverse_kl_start'])} -> {_fmt(e['reverse_kl'])}")
    if findings_file.is_file():
        print("\nfindings (rules in docs/findings.md; evidence in the report)")
        print(format_table(build_findings(findings_inputs(discover(findings_file.parent.parent)))))


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "  -  "
