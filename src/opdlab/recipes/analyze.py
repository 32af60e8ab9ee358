"""`opdlab analyze BASE TUNED --out DIR`: how TUNED differs from BASE, tensor by tensor.

    opdlab analyze Qwen2.5-0.5B/ runs/opd --out runs/opd/analysis --dtype bf16

    torchrun --nproc-per-node 8 -m opdlab analyze BASE TUNED --out DIR --device cuda

Reads: two checkpoints (HF folders, .safetensors files or opdlab run folders), streamed one
tensor pair at a time. Writes to --out: analysis.json (summary + layer/module/block tables),
tensors.csv, groups_{layer,module,block}.csv, spectra.safetensors and PNG figures.
Under torchrun the tensors are shared out across the processes (dist/work.py; each process on
cuda:LOCAL_RANK with --device cuda, else on CPU with gloo), every process analyses its share,
and rank 0 gathers the per-tensor results and writes the same files one process writes.
Definitions: DESIGN.md "Analysis: definitions"; every output key: docs/analysis.md.

Where this deviates from the study's script, and why:
  1. Singular values come from fp64 Gram matrices (exact, and below fp32 svdvals' noise floor).
  2. Magnitude masks split ties at the threshold evenly (bf16 weights tie a lot) instead of
     taking whatever order a sort returns.
  3. fp32 checkpoints, where they exist, add the precision control next to the bf16 result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from opdlab.analysis.aggregate import GROUP_KINDS, group_table, summary, tensor_rows
from opdlab.analysis.pairs import run_method
from opdlab.analysis.per_tensor import TensorResult
from opdlab.analysis.stream import default_workers, open_pair, run_tensors, tensor_cost
from opdlab.analysis.writers import write_analysis
from opdlab.config import AnalyzeConfig
from opdlab.devices import check_device
from opdlab.dist.runtime import DistContext, init_from_env
from opdlab.dist.work import balanced_shares
from opdlab.errors import UserError
from opdlab.fileio import prepare_out_dir, relative_path
from opdlab.report import figures_analysis as F


def analyze(cfg: AnalyzeConfig) -> Path | None:
    """Analyse the pair; the output folder (None on ranks other than 0 under torchrun)."""
    check_device(cfg.device, "--device")
    ctx = init_from_env(cfg.device, field="device")
    pair = open_pair(cfg.base, cfg.tuned, cfg.dtype, skip_mismatched=cfg.skip_mismatched)
    if pair.skipped and ctx.is_main:
        print(f"opdlab analyze: skipping {len(pair.skipped)} tensor(s): " + "; ".join(pair.skipped), file=sys.stderr)
    out = ctx.run_on_main(lambda: prepare_out_dir(cfg.out, cfg.overwrite, inputs={"BASE": cfg.base, "TUNED": cfg.tuned}))

    results = _analyze_share(ctx, pair.specs, cfg)
    if not ctx.is_main:
        return None

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
    F.layer_sparsity(groups["layer"], out / "layer_sparsity.png")
    F.movement_heatmap(rows, out / "movement_layer_module.png")
    F.energy_share_by_module(groups["module"], out / "energy_share_module.png")
    F.delta_spectra({n: spectra[n].tolist() for n in _representative(rows, spectra)}, out / "delta_spectra.png")
    F.principal_energy_by_rho(totals, out / "principal_energy_rho.png")
    F.magnitude_enrichment_by_rho(totals, out / "magnitude_enrichment_rho.png")
    write_analysis(out, header, totals, groups, rows, spectra)  # analysis.json last: it marks a finished analysis
    return out


def _analyze_share(ctx: DistContext, specs: list, cfg: AnalyzeConfig) -> list[TensorResult]:
    """This process's share of the tensors, analysed, then everyone's results in the specs' order.

    A one-line error on any rank (a corrupted tensor) becomes the same error on every rank,
    instead of leaving the others waiting in the gather.
    """
    shares = balanced_shares([tensor_cost(s.shape, cfg.exact_svd_max) for s in specs], ctx.world_size)
    mine = [specs[i] for i in shares[ctx.rank]]
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)) if ctx.distributed else 1
    workers = cfg.workers or default_workers(cfg.device, processes)
    try:
        status: tuple[str, object] = ("ok", run_tensors(mine, cfg.exact_svd_max, cfg.device, workers,
                                                        progress=ctx.is_main))
    except UserError as exc:
        if not ctx.distributed:
            raise
        status = ("error", str(exc))
    gathered = ctx.all_gather_objects(status)
    errors = [payload for kind, payload in gathered if kind == "error"]
    if errors:
        raise UserError(str(errors[0]))
    by_name = {r.name: r for _, payload in gathered for r in payload}  # type: ignore[union-attr]
    return [by_name[s.name] for s in specs]


def _representative(rows: list[dict], spectra: dict) -> list[str]:
    """One matrix per module type from the middle decoder layer, plus the embedding (at most 6)."""
    layers = sorted({r["layer"] for r in rows if r["layer"] != ""})
    mid = layers[len(layers) // 2] if layers else None
    picked: dict[str, str] = {}
    for r in rows:
        if r["name"] in spectra and (r["layer"] == mid or r["module"] == "embed") and r["module"] not in picked:
            picked[r["module"]] = r["name"]
    return list(picked.values())[:6]
