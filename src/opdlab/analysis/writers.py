"""Write analysis and compare outputs (atomically): JSON summaries, CSV tables, Δ spectra.

Schemas (stable names, documented key by key in docs/analysis.md):
  analysis.json  {"schema": 1, "base", "tuned", "method", "dtype", "fp32_precision_control", "exact_svd_max",
                  "skipped", ["base_format",] "summary": {…}, "groups": {"layer": […], "module": […], "block": […]}}
  tensors.csv    one row per tensor pair (see aggregate.tensor_rows)
  groups_<kind>.csv  the group tables as CSV
  spectra.safetensors  singular values of each 2-D Δ, keyed by tensor name
  compare.json   {"schema": 1, "base", "run_a", "run_b", "dtype", "atol", "skipped", "summary": {…},
                  "groups": {"module": […], "layer": […], "block": […]}}
  compare.csv    one row per tensor: counts and overlap statistics
Paths ("base", "tuned", "run_a", "run_b") are relative to the file's folder when they name something on
disk (`fileio.relative_path`); "method" is the training method of the tuned run (null when TUNED is
not an opdlab run).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import torch

from opdlab.fileio import save_safetensors, write_json, write_text

SCHEMA = 1


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(v)
    return v


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as CSV; NaN/inf become empty cells; columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k, "")) for k in columns})
    return write_text(path, buf.getvalue())


def write_spectra(path: Path, spectra: dict[str, torch.Tensor]) -> Path:
    """Singular values of each 2-D Δ (fp32 vectors) as one safetensors file."""
    return save_safetensors(path, {k: v.to(torch.float32).contiguous() for k, v in spectra.items()}
                            or {"_empty": torch.zeros(0)}, metadata={"what": "singular values of delta, descending"})


def write_analysis(out: Path, header: dict[str, Any], summary: dict[str, Any], groups: dict[str, list],
                   tensor_rows: list[dict[str, Any]], spectra: dict[str, torch.Tensor]) -> dict[str, Path]:
    """tensors.csv, groups_<kind>.csv, spectra.safetensors and, last, analysis.json in `out`.

    analysis.json is what marks a finished analysis (the report looks for it), so it is written
    only once everything else is in place: an interrupted analysis leaves a folder without it.
    """
    doc = {"schema": SCHEMA, **header, "summary": summary, "groups": groups}
    paths = {"tensors": write_csv(out / "tensors.csv", tensor_rows)}
    for kind, rows in groups.items():
        paths[f"groups_{kind}"] = write_csv(out / f"groups_{kind}.csv", rows)
    paths["spectra"] = write_spectra(out / "spectra.safetensors", spectra)
    paths["analysis"] = write_json(out / "analysis.json", doc)
    return paths


def write_compare(out: Path, header: dict[str, Any], summary: dict[str, Any], groups: dict[str, list],
                  tensor_rows: list[dict[str, Any]]) -> dict[str, Path]:
    """compare.csv and, last (it marks a finished compare), compare.json in `out`."""
    doc = {"schema": SCHEMA, **header, "summary": summary, "groups": groups}
    paths = {"csv": write_csv(out / "compare.csv", tensor_rows)}
    return {"compare": write_json(out / "compare.json", doc), **paths}
