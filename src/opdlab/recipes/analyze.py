"""`opdlab analyze BASE TUNED --out DIR`: how TUNED differs from BASE, tensor by tensor.

    opdlab analyze Qwen2.5-0.5B/ runs/opd --out runs/opd/analysis --dtype bf16

Reads: two checkpoints (HF folders, .safetensors files or opdlab run folders), streamed one
tensor pair at a time. Writes to --out: analysis.json (summary + layer/module/block tables),
tensors.csv, groups_{layer,module,block}.csv, spectra.safetensors and PNG figures.
Definitions: DESIGN.md "Analysis: definitions"; every output key: docs/analysis.md.

Where this deviates from the study's script, and why:
  1. Singular values come from fp64 Gram matrices (exact, and below fp32 svdvals' noise floor).
  2. Magnitude masks split ties at the threshold evenly (bf16 weights tie a lot) instead of
     taking whatever order a sort returns.
  3. fp32 checkpoints, where they exist, add the precision control next to the bf16 result.
"""

from __future__ import annotations

import sys
from pathlib import Path

from opdlab.analysis.aggregate import GROUP_KINDS, group_table, summary, tensor_rows
from opdlab.analysis.pairs import run_method
from opdlab.analysis.stream import open_pair, run_tensors
from opdlab.analysis.writers import write_analysis
from opdlab.config import AnalyzeConfig
from opdlab.devices import check_device
from opdlab.fileio import prepare_out_dir, relative_path
from opdlab.report import figures_analysis as F


def analyze(cfg: AnalyzeConfig) -> Path:
    check_device(cfg.device, "--device")
    pair = open_pair(cfg.base, cfg.tuned, cfg.dtype, skip_mismatched=cfg.skip_mismatched)
    if pair.skipped:
        print(f"opdlab analyze: skipping {len(pair.skipped)} tensor(s): " + "; ".join(pair.skipped), file=sys.stderr)
    out = prepare_out_dir(cfg.out, cfg.overwrite, inputs={"BASE": cfg.base, "TUNED": cfg.tuned})

    results = run_tensors(pair.specs, cfg.exact_svd_max, cfg.device, cfg.workers)

    rows = tensor_rows(results)
    groups = {kind: group_table(results, kind) for kind in GROUP_KINDS}
    # Paths relative to the output folder (it can move as a whole); the method of the run analysed, if any.
    header = {"base": relative_path(cfg.base, out), "tuned": relative_path(cfg.tuned, out),
              "method": run_method(cfg.tuned), "dtype": cfg.dtype, "fp32_precision_control": pair.fp32,
              "exact_svd_max": cfg.exact_svd_max, "skipped": pair.skipped}
    if pair.base_format:  # e.g. a dequantized GGUF base: the report adds its caveat
        header["base_format"] = pair.base_format
    spectra = {r.name: r.spectrum for r in results if r.spectrum is not None}
    totals = summary(results)
    write_analysis(out, header, totals, groups, rows, spectra)

    F.layer_sparsity(groups["layer"], out / "layer_sparsity.png")
    F.movement_heatmap(rows, out / "movement_layer_module.png")
    F.energy_share_by_module(groups["module"], out / "energy_share_module.png")
    F.delta_spectra({n: spectra[n].tolist() for n in _representative(rows, spectra)}, out / "delta_spectra.png")
    F.principal_energy_by_rho(totals, out / "principal_energy_rho.png")
    F.magnitude_enrichment_by_rho(totals, out / "magnitude_enrichment_rho.png")
    return out


def _representative(rows: list[dict], spectra: dict) -> list[str]:
    """One matrix per module type from the middle decoder layer, plus the embedding (at most 6)."""
    layers = sorted({r["layer"] for r in rows if r["layer"] != ""})
    mid = layers[len(layers) // 2] if layers else None
    picked: dict[str, str] = {}
    for r in rows:
        if r["name"] in spectra and (r["layer"] == mid or r["module"] == "embed") and r["module"] not in picked:
            picked[r["module"]] = r["name"]
    return list(picked.values())[:6]
