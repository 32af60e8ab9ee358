"""`opdlab report DIR`: one self-contained report.html from the files under DIR.

    opdlab report opdlab-demo            # -> opdlab-demo/report/report.html
    opdlab report runs/opd --out /tmp/r  # a single run folder works too

Reads only files (run folders, analysis / compare outputs, experiment JSONs; formats
in docs/formats.md), never weights: the report can be regenerated at any time without
retraining. Writes report.html, figures/*.png and findings.json into the output folder.
"""

from __future__ import annotations

from pathlib import Path

from opdlab.config import ReportConfig
from opdlab.errors import UserError
from opdlab.fileio import prepare_own_dir
from opdlab.report.discover import discover, findings_inputs
from opdlab.report.findings import build_findings
from opdlab.report.claims_experiments import mask_discovery_summary
from opdlab.report.html import build_sections, write_report


def report(cfg: ReportConfig) -> Path:
    """Discover what DIR holds, decide the findings, render the page; returns the report.html path."""
    root = Path(cfg.path)
    if not cfg.path:
        raise UserError("report: give a folder, e.g. `opdlab report opdlab-demo`")
    out = Path(cfg.out) if cfg.out else root / "report"
    found = discover(root, skip=out)
    # Only a new or empty folder, or one opdlab made: figures/ and report.html are replaced there.
    prepare_own_dir(out)
    rows = build_findings(findings_inputs(found))
    sections, _ = build_sections(found, rows)
    title = f"opdlab report: {root.resolve().name}"
    try:
        return write_report(out, rows, sections, title=title, source=str(root),
                            mask_discovery=mask_discovery_summary(found.mask_discovery))
    except OSError as exc:
        raise UserError(f"{out}: cannot write the report there ({exc.strerror}); choose another --out") from None
