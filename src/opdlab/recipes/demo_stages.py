"""The stages every demo shares: the manifest of finished stages, analysis, and the report.

    manifest = open_manifest(out, "default", resume=False, overwrite=False)
    manifest.run("opd", "run", out / "runs" / "opd", lambda: train(...), out)   # skipped when done before
    analyze_runs(manifest, source, {"opd": out / "runs" / "opd"}, out)
    write_report(manifest, out, runs)      # report/report.html, and the findings on the terminal

`opdlab study` (recipes/study.py) calls these; `opdlab demo` and its `--real` and `--vlm` presets
are studies (recipes/demo.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from opdlab import __version__
from opdlab.config import AnalyzeConfig, ReportConfig, load_config
from opdlab.errors import UserError
from opdlab.fileio import OUTPUT_MARKER, prepare_out_dir, read_json, write_json
from opdlab.recipes.analyze import analyze
from opdlab.recipes.arms import final_eval
from opdlab.recipes.report import report
from opdlab.report.claims_experiments import mask_discovery_summary
from opdlab.report.discover import discover, findings_inputs
from opdlab.report.findings import build_findings, format_table


# Stage kinds whose cost scales with training steps (their plan weight is steps); the others with their count.
TRAINING_KINDS = ("run", "experiment")


MANIFEST = "demo.json"


def open_manifest(out: Path, preset: str, resume: bool, overwrite: bool,
                  inputs: dict[str, Any] | None = None) -> "Manifest":
    """Prepare the study folder `out` and its manifest: a new (or, with `overwrite`, replaced) folder,
    or with `resume` an existing one that holds `demo.json`; a folder of any other kind is refused
    before anything is written into it. `inputs`: see `fileio.refuse_out_over_inputs`."""
    if resume and out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file() or not (out / OUTPUT_MARKER).is_file():
            raise UserError(f"--resume --out {out}: not a demo folder (no {MANIFEST} written by opdlab demo or "
                            "study); pass the folder of an interrupted demo, or a new --out without --resume")
    else:
        prepare_out_dir(out, overwrite, inputs)
    manifest = Manifest(out, preset, resume)
    if not manifest.path.is_file():
        write_json(manifest.path, manifest.data)  # from the start, so a demo killed in its first stage can resume
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """A demo.json to resume from; a UserError naming it when it is damaged."""
    fix = "restore it, or start again with --overwrite"
    data = read_json(path, fix=fix)
    stages = data.get("stages", [])
    if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                               and isinstance(s.get("status"), str) for s in stages):
        raise UserError(f"{path}: field 'stages' must be a list of {{name, status, ...}} objects; {fix}")
    total = data.get("total_s", 0.0)
    if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float))):
        raise UserError(f"{path}: field 'total_s' must be a number of seconds; {fix}")
    return data


class Manifest:
    """`demo.json`: which stages ran, where their results are, and how long they took.

    With `plan({name: (kind, weight)})` (weight: training steps for runs and experiments, 1 for an
    analysis or report) every finished stage also prints its position and an estimate of the time
    left: the remaining weight of each kind times the seconds per unit measured so far for that
    kind (training kinds share one rate; `prior_s` per unit until a stage of that class has run).
    """

    def __init__(self, out: Path, preset: str, resume: bool) -> None:
        self.path = out / MANIFEST
        self.started = time.time()
        old = read_manifest(self.path) if resume and self.path.is_file() else {}
        self.data: dict[str, Any] = {"schema": 1, "preset": preset, "opdlab_version": __version__,
                                     "stages": old.get("stages", []), "total_s": old.get("total_s", 0.0)}
        self._base_total = float(self.data["total_s"] or 0.0)
        self._plan: dict[str, tuple[str, float]] = {}
        self._prior: dict[str, float] = {}
        self._spent: dict[str, list[float]] = {}  # rate class -> [seconds, weight] of stages run in this process

    def plan(self, stages: dict[str, tuple[str, float]], prior_s: dict[str, float] | None = None) -> None:
        """The stages to come, {name: (kind, weight)}, and prior seconds per unit of weight by class."""
        self._plan = dict(stages)
        self._prior = dict(prior_s or {})

    @staticmethod
    def _rate_class(kind: str) -> str:
        return "train" if kind in TRAINING_KINDS else kind

    def time_left(self) -> float | None:
        """Estimated seconds for the planned stages not done yet (None without a rate for some of them)."""
        total = 0.0
        for name, (kind, weight) in self._plan.items():
            if self.done(name):
                continue
            cls = self._rate_class(kind)
            spent = self._spent.get(cls)
            rate = spent[0] / spent[1] if spent and spent[1] > 0 else self._prior.get(cls)
            if rate is None:
                return None
            total += rate * weight
        return total

    def progress(self) -> str:
        """'[k/N done, about M min left]' for a planned study; '' without a plan."""
        if not self._plan:
            return ""
        finished = sum(1 for name in self._plan if self.done(name))
        left = self.time_left()
        eta = "" if left is None else f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
        return f" [{finished}/{len(self._plan)} stages done{eta}]"

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
        if name in self._plan:
            spent = self._spent.setdefault(self._rate_class(self._plan[name][0]), [0.0, 0.0])
            spent[0] += seconds
            spent[1] += self._plan[name][1]
        print(f"  [{kind}] {name}: {seconds:.0f} s{self.progress()}", flush=True)
        return result


def analyze_pair(source: Path, tuned: Path, dest: Path, dtype: str = "bf16") -> Path:
    """`opdlab analyze SOURCE TUNED --out DEST` (replacing an earlier DEST)."""
    return analyze(load_config(AnalyzeConfig, None, {"base": str(source), "tuned": str(tuned), "out": str(dest),
                                                     "dtype": dtype, "overwrite": True}))


def analyze_runs(manifest: Manifest, source: Path, runs: dict[str, Path], out: Path, main: str = "opd") -> None:
    """Analyze every run against the source in bf16, plus the fp32 twin of `main` (precision control)."""
    for name, run_dir in runs.items():
        dest = out / "analysis" / name
        manifest.run(f"analysis-{name}", "analysis", dest, lambda r=run_dir, d=dest: analyze_pair(source, r, d), out)
    dest = out / "analysis" / f"{main}-fp32"
    manifest.run(f"analysis-{main}-fp32", "analysis", dest, lambda: analyze_pair(source, runs[main], dest, "fp32"), out)


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
    main = next(iter(runs.values()), None)  # the main run's step-0 evaluation stands in for arms without one
    for name, run_dir in runs.items():
        try:
            e = final_eval(run_dir, start_from=main)
        except UserError:
            continue
        print(f"  {name:<12} acc {_fmt(e['accuracy_start'])} -> {_fmt(e['accuracy'])}   "
              f"KL {_fmt(e['reverse_kl_start'])} -> {_fmt(e['reverse_kl'])}")
    if findings_file.is_file():
        print("\nfindings (rules in docs/findings.md; evidence in the report)")
        found = discover(findings_file.parent.parent)
        print(format_table(build_findings(findings_inputs(found))))
        discovery = mask_discovery_summary(found.mask_discovery)
        if discovery is not None:
            print(f"\nearly subnetwork discovery: {discovery['statement']}")


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "  -  "
