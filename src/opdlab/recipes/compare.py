"""`opdlab compare BASE RUN_A RUN_B --out DIR`: do two runs update the same coordinates?

    opdlab compare base/ runs/opd runs/sft --out runs/compare --atol 0

Changed masks U_A = |A − BASE| > atol and U_B = |B − BASE| > atol, in the analysis dtype.
Writes compare.json (Jaccard and one-sided coverage with independent-mask baselines and
ratios; overall and by module, layer and block), compare.csv (per tensor) and
compare_jaccard_module.png. Keys: docs/analysis.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from opdlab.analysis.overlap import overlap_groups, overlap_rows, overlap_summary
from opdlab.analysis.writers import write_compare
from opdlab.config import CompareConfig
from opdlab.devices import check_device
from opdlab.fileio import prepare_out_dir, relative_path
from opdlab.report import figures_analysis as F


def compare(cfg: CompareConfig) -> Path:
    check_device(cfg.device, "--device")
    # --out is checked (and created) after the inputs, so a typo in a path leaves it alone.
    result = overlap_rows(cfg.base, cfg.run_a, cfg.run_b, cfg.dtype, cfg.atol, cfg.device, cfg.skip_mismatched)
    if result.skipped:
        print(f"opdlab compare: skipping {len(result.skipped)} tensor(s): " + "; ".join(result.skipped), file=sys.stderr)
    out = prepare_out_dir(cfg.out, cfg.overwrite, inputs={"BASE": cfg.base, "RUN_A": cfg.run_a, "RUN_B": cfg.run_b})
    groups = overlap_groups(result.rows)
    header = {"base": relative_path(cfg.base, out), "run_a": relative_path(cfg.run_a, out),
              "run_b": relative_path(cfg.run_b, out), "dtype": cfg.dtype, "atol": cfg.atol, "skipped": result.skipped}
    F.compare_jaccard_by_module(groups["module"], out / "compare_jaccard_module.png")
    write_compare(out, header, overlap_summary(result.rows), groups, result.rows)  # compare.json last: finished
    return out
