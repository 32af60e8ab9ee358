"""Find and load everything a report can show, by walking a folder for marker files.

`opdlab report DIR` works on a demo folder, a single run, analysis, compare or
experiment folder, or any folder holding several of them: whatever marker files
exist under DIR decide what the report shows (the formats are in docs/formats.md).

    found = discover(Path("opdlab-demo"))
    found.runs[0].metrics[-1]["eval/accuracy"]

Markers: `metrics.jsonl` (run folder), `analysis.json` (analysis folder),
`compare.json` (compare folder), `subnetwork.json`, `optimizers.json`,
`lr_sweep.json` (experiment outputs) and `demo.json` (demo manifest).
Nothing here computes metrics; it only reads files.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opdlab.errors import UserError
from opdlab.fileio import read_json as fileio_read_json
from opdlab.fileio import read_jsonl, resolve_path
from opdlab.report.findings import FindingInputs

SCHEMA = 1  # newest schema version of every JSON file this module reads
MARKERS = ("metrics.jsonl", "analysis.json", "compare.json", "subnetwork.json", "optimizers.json",
           "lr_sweep.json", "mask_discovery.json", "demo.json")
# Folders that never hold markers and can be large (checkpoints): not walked.
_SKIP_DIRS = {"checkpoints", "final", "final-fp32", "figures", "__pycache__", "node_modules"}
# Demo sub-folders whose name adds nothing to a run's name ("runs/opd" -> "opd").
_GROUP_DIRS = {"runs", "analysis", "analyses", "compare", "compares", "experiments"}
METHODS = ("opd", "sft", "rl")  # the methods the findings compare
# Method labels a run or analysis may carry, and the finding method each counts as: opsd (on-policy
# self-distillation, the teacher being the frozen source shown privileged context) is OPD with a self-teacher.
METHOD_FAMILY = {"opd": "opd", "opsd": "opd", "sft": "sft", "rl": "rl"}


def method_family(label: str | None) -> str | None:
    """The METHODS entry a method label counts as ('opsd' -> 'opd'); None for unknown labels."""
    return METHOD_FAMILY.get(label) if isinstance(label, str) else None


@dataclass
class Run:
    """A run folder: resolved config and the metrics log (one flat dict per logged step)."""

    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def method(self) -> str | None:
        m = self.config.get("method")
        return m if isinstance(m, str) else None


@dataclass
class Analysis:
    """An analysis folder: `analysis.json`, the rows of `tensors.csv` and the PNGs it wrote."""

    name: str
    path: Path
    data: dict[str, Any]
    tensors: list[dict[str, Any]]
    pngs: list[Path]
    method: str | None = None  # label as recorded (opd, opsd, sft, rl); `family` is what the findings use

    @property
    def family(self) -> str | None:
        return method_family(self.method)

    @property
    def summary(self) -> dict[str, Any]:
        return self.data.get("summary") or {}

    @property
    def dtype(self) -> str:
        return str(self.data.get("dtype") or "bf16")


@dataclass
class Compare:
    """A compare folder: `compare.json`."""

    name: str
    path: Path
    data: dict[str, Any]


@dataclass
class Found:
    """Everything found under one folder; lists are sorted by name, experiments may be None."""

    root: Path
    demo: dict[str, Any] | None = None
    runs: list[Run] = field(default_factory=list)
    analyses: list[Analysis] = field(default_factory=list)
    compares: list[Compare] = field(default_factory=list)
    subnetwork: dict[str, Any] | None = None
    optimizers: dict[str, Any] | None = None
    lr_sweep: dict[str, Any] | None = None
    mask_discovery: dict[str, Any] | None = None
    sources: dict[str, Path] = field(default_factory=dict)  # experiment kind -> file it came from

    def empty(self) -> bool:
        return not (self.demo or self.runs or self.analyses or self.compares or self.subnetwork
                    or self.optimizers or self.lr_sweep or self.mask_discovery)


# ----------------------------------------------------------------------------- readers


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, with a one-line UserError for bad files or newer schemas."""
    obj = fileio_read_json(path, fix="re-run the step that wrote it")
    schema = obj.get("schema", SCHEMA)
    if isinstance(schema, int) and schema > SCHEMA:
        raise UserError(f"{path}: schema {schema} is newer than this opdlab reads ({SCHEMA}); upgrade opdlab")
    return check_shape(path, obj)


# Top-level fields whose JSON type the report relies on: file -> {field: (type, what it should be)}.
_SHAPES: dict[str, dict[str, tuple[type, str]]] = {
    "analysis.json": {"summary": (dict, "an object of summary metrics"), "groups": (dict, "an object of group tables")},
    "compare.json": {"summary": (dict, "an object of overlap metrics")},
    "subnetwork.json": {"source": (dict, "an object with the source's accuracy and reverse_kl"),
                        "runs": (dict, "an object keyed by arm (full, subnetwork, random)")},
    "optimizers.json": {"sweep": (list, "a list of {optimizer, lr, accuracy, reverse_kl} rows"),
                        "second_moment_cv": (dict, "an object keyed by method")},
    "lr_sweep.json": {"points": (list, "a list of per-lr points")},
    "mask_discovery.json": {"source": (dict, "an object with the source's held-out figures"),
                            "full": (dict, "an object with the full run's held-out figures"),
                            "arms": (dict, "an object keyed by arm (step-K, source, final, random)")},
    "demo.json": {"stages": (list, "a list of stages")},
}


def check_shape(path: Path, obj: dict[str, Any]) -> dict[str, Any]:
    """One-line UserError when a present field of a known file has the wrong JSON type (see docs/formats.md)."""
    for key, (tp, what) in _SHAPES.get(path.name, {}).items():
        if key in obj and obj[key] is not None and not isinstance(obj[key], tp):
            raise UserError(f"{path}: field '{key}' must be {what} (docs/formats.md); re-run the step that wrote it")
    return obj


def _number(text: str) -> Any:
    """CSV cell -> int, float or the original text (empty -> None)."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with numeric cells converted."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [{k: _number(v or "") for k, v in row.items() if k is not None} for row in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read as CSV ({exc}); re-run `opdlab analyze`") from None


def read_run(path: Path, name: str) -> Run:
    """A run folder (needs `metrics.jsonl`; `config.yaml` is optional)."""
    config: dict[str, Any] = {}
    cfg_file = path / "config.yaml"
    if cfg_file.is_file():
        try:
            loaded = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise UserError(f"{cfg_file}: not valid YAML; re-run `opdlab distill` or fix the file") from None
        config = loaded if isinstance(loaded, dict) else {}
    metrics = read_jsonl(path / "metrics.jsonl", fix="restore the file, or delete that line to report the rest")
    return Run(name=name, path=path, config=config, metrics=metrics)


def read_analysis(path: Path, name: str) -> Analysis:
    """An analysis folder (`analysis.json`, optional `tensors.csv` and PNGs)."""
    data = read_json(path / "analysis.json")
    if not isinstance(data.get("summary"), dict):
        raise UserError(f"{path / 'analysis.json'}: missing the 'summary' object; re-run `opdlab analyze`")
    tensors = read_csv(path / "tensors.csv") if (path / "tensors.csv").is_file() else []
    pngs = sorted(p for p in path.rglob("*.png") if p.is_file())
    return Analysis(name=name, path=path, data=data, tensors=tensors, pngs=pngs)


# ----------------------------------------------------------------------------- method labels


def analysis_method(a: Analysis, root: Path) -> str | None:
    """Which training method (a METHOD_FAMILY label) produced the tuned side of an analysis: the
    "method" that `opdlab analyze` records in analysis.json (null when TUNED was not an opdlab run).
    Files written before it recorded one get `_legacy_method`."""
    if "method" not in a.data:
        return _legacy_method(a, root)
    method = a.data["method"]
    return method if method in METHOD_FAMILY else None


def method_from_name(name: str) -> str | None:
    """'opd', 'opsd', 'sft' or 'rl' when exactly one of them is a word of `name` ('analysis/opd-lr1e-6' -> 'opd')."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    hits = [m for m in METHOD_FAMILY if m in words]
    return hits[0] if len(hits) == 1 else None


def _legacy_method(a: Analysis, root: Path) -> str | None:
    """For an analysis.json without "method" (older opdlab, or written by hand): the `method` in the
    config.yaml of the run folder its `tuned` path points into, else a method word of the folder name."""
    tuned = a.data.get("tuned")
    if isinstance(tuned, str) and tuned:
        for cand in (resolve_path(tuned, a.path), root / tuned, Path(tuned)):
            for folder in (cand, cand.parent):  # a run folder, or its final/ checkpoint
                if (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").is_file():
                    try:
                        loaded = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
                    except (yaml.YAMLError, OSError, UnicodeDecodeError):
                        return None
                    method = loaded.get("method") if isinstance(loaded, dict) else None
                    return method if method in METHOD_FAMILY else None
    return method_from_name(a.name) or method_from_name(a.path.name)


# ----------------------------------------------------------------------------- walking


def _display_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    if rel == ".":
        return root.resolve().name or "."
    parts = rel.split("/")
    if len(parts) > 1 and parts[0] in _GROUP_DIRS:
        parts = parts[1:]
    return "/".join(parts)


def _resolve_dir(path: str, json_file: Path, root: Path) -> Path | None:
    """The existing folder a result file names: relative to the file's folder (as opdlab writes them)
    or absolute. Files written before paths were relative to the file held paths relative to the
    working folder of that time: for those, the path relative to DIR or to the working folder now, or
    its trailing parts under the file's folder or DIR, are tried."""
    recorded = resolve_path(path, json_file.parent)
    if recorded.is_dir() or Path(path).is_absolute():
        return recorded if recorded.is_dir() else None
    p = Path(path)
    bases = (json_file.parent, root)
    cands = [root / p, p] + [b / Path(*p.parts[-k:]) for k in range(len(p.parts) - 1, 0, -1) for b in bases]
    return next((c for c in cands if c.is_dir()), None)


def fill_num_eval(obj: dict[str, Any], json_file: Path, root: Path) -> None:
    """Set obj["num_eval"] (eval prompts behind each accuracy, for the noise test) from the config.yaml
    of the first run folder the experiment names, when the experiment file does not record it."""
    if isinstance(obj.get("num_eval"), int):
        return
    runs = obj.get("runs")
    rows = list(runs.values()) if isinstance(runs, dict) else []
    rows += [r for r in obj.get("sweep") or [] if isinstance(r, dict)]
    for row in rows:
        d = row.get("run_dir") if isinstance(row, dict) else None
        folder = _resolve_dir(d, json_file, root) if isinstance(d, str) and d else None
        if folder is not None and (folder / "config.yaml").is_file():
            try:
                cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                continue
            n = ((cfg or {}).get("data") or {}).get("num_eval") if isinstance(cfg, dict) else None
            if isinstance(n, int) and n > 0:
                obj["num_eval"] = n
                return


def discover(root: Path, skip: Path | None = None) -> Found:
    """Walk `root` (not following links, skipping checkpoints and `skip`) and load every marker file.

    Raises UserError when `root` is not a folder or holds nothing a report can show.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; pass a demo, run, analysis, compare or experiment folder")
    skip_resolved = skip.resolve() if skip is not None else None
    found = Found(root=root)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
                             and (skip_resolved is None or (here / d).resolve() != skip_resolved))
        files = set(filenames)
        name = _display_name(here, root)
        if "metrics.jsonl" in files:
            found.runs.append(read_run(here, name))
        if "analysis.json" in files:
            found.analyses.append(read_analysis(here, name))
        if "compare.json" in files:
            found.compares.append(Compare(name=name, path=here, data=read_json(here / "compare.json")))
        for kind in ("subnetwork", "optimizers", "lr_sweep", "mask_discovery"):
            # The first one found (the walk is sorted, shallowest folders first per branch) wins.
            if f"{kind}.json" in files and getattr(found, kind) is None:
                setattr(found, kind, read_json(here / f"{kind}.json"))
                found.sources[kind] = here / f"{kind}.json"
        if "demo.json" in files and found.demo is None:
            found.demo = read_json(here / "demo.json")
            found.sources["demo"] = here / "demo.json"
    for a in found.analyses:
        a.method = analysis_method(a, root)
    for kind in ("subnetwork", "optimizers"):
        if getattr(found, kind) is not None:
            fill_num_eval(getattr(found, kind), found.sources[kind], root)
    if found.empty():
        raise UserError(f"{root}: found nothing to report (looked for {', '.join(MARKERS)}); "
                        "pass a folder written by opdlab distill, analyze, compare, experiment or demo")
    return found


def sweep_analysis_dirs(found: Found) -> set[Path]:
    """Resolved analysis folders named by `lr_sweep.json` (they are sweep points, not the main analysis)."""
    out: set[Path] = set()
    if not found.lr_sweep:
        return out
    for point in found.lr_sweep.get("points") or []:
        d = point.get("analysis_dir") if isinstance(point, dict) else None
        folder = _resolve_dir(d, found.sources["lr_sweep"], found.root) if isinstance(d, str) and d else None
        if folder is not None:
            out.add(folder.resolve())
    return out


def main_analyses(found: Found) -> list[Analysis]:
    """Analyses that are not lr-sweep points, in name order."""
    sweep = sweep_analysis_dirs(found)
    return [a for a in found.analyses if a.path.resolve() not in sweep]


def primary_analysis(found: Found) -> Analysis | None:
    """The analysis the per-model claims are measured on: the OPD one in the study's dtype (bf16).

    Preference: OPD (method opd, or opsd: OPD with a self-teacher) and dtype bf16, then OPD in
    any dtype, then (when the folder holds a single bf16 analysis, whatever its method) that one.
    Ties: plain opd before opsd (the study's method), then the shortest name.
    """
    cands = main_analyses(found)
    for pick in (lambda a: a.family == "opd" and a.dtype == "bf16", lambda a: a.family == "opd"):
        hits = [a for a in cands if pick(a)]
        if hits:
            return min(hits, key=_opd_order)
    # No OPD label: a folder with a single analysis (plus perhaps its fp32 twin) is measured as it is.
    bf16 = [a for a in cands if a.dtype != "fp32"]
    if len(bf16) == 1:
        return bf16[0]
    return cands[0] if len(cands) == 1 else None


def companion_fp32(found: Found, a: Analysis) -> Analysis | None:
    """An fp32 analysis of the same base and tuned checkpoints as `a` (for the precision caveat)."""
    if a.dtype == "fp32":
        return None
    for other in found.analyses:
        if other is not a and other.dtype == "fp32" and all(_same_path(a, other, key) for key in ("base", "tuned")):
            return other
    return None


def _same_path(a: Analysis, b: Analysis, key: str) -> bool:
    """Whether two analyses name the same checkpoint under `key` (each path relative to its own file)."""
    x, y = a.data.get(key), b.data.get(key)
    if isinstance(x, str) and isinstance(y, str):
        px, py = resolve_path(x, a.path), resolve_path(y, b.path)
        if px.exists() and py.exists():
            return px.resolve() == py.resolve()
    return x == y  # names that are not paths on this machine (a model name, a moved checkpoint)


def _opd_order(a: Analysis) -> tuple[int, int, str]:
    return (0 if a.method == "opd" else 1, len(a.name), a.name)


def method_analyses(found: Found) -> dict[str, Analysis]:
    """One bf16 analysis per finding method (opd / sft / rl; an opsd analysis counts as opd) among the
    main analyses."""
    out: dict[str, Analysis] = {}
    for a in sorted(main_analyses(found), key=_opd_order):
        if a.family in METHODS and a.dtype == "bf16" and a.family not in out:
            out[a.family] = a
    return out


def findings_inputs(found: Found) -> FindingInputs:
    """What the findings table is computed from, chosen among everything found."""
    main = primary_analysis(found)
    fp32 = companion_fp32(found, main) if main is not None else None
    return FindingInputs(
        analysis=main.data if main else None,
        analysis_name=f"analysis {main.name}" if main else "",
        analysis_fp32=fp32.data if fp32 else None,
        tensors=main.tensors if main else [],
        by_method={m: a.data for m, a in method_analyses(found).items()},
        method_labels={m: a.method for m, a in method_analyses(found).items() if a.method and a.method != m},
        subnetwork=found.subnetwork, optimizers=found.optimizers, lr_sweep=found.lr_sweep)
